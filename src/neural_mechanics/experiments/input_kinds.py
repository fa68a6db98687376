"""What the example inputs of a model hold: floats, or token ids below a vocabulary size.

Symmetry detection and the constraint checks run the model on example inputs (`ResolvedModel.example_inputs`,
experiments/specs.py). A model whose first parameterised layer is an nn.Embedding reads token ids: its example
inputs are integers below the embedding's row count; `--input-dtype` (`parse_input_dtype`) and `--vocab` say so
explicitly. `example_input_kind` states the rule.
"""

from __future__ import annotations

import torch
from torch import nn

from neural_mechanics.errors import InputShapeError

__all__ = ["INPUT_DTYPES", "dtype_name", "example_input_kind", "is_token_dtype", "parse_input_dtype"]

#: The names `--input-dtype` accepts.
INPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
    "long": torch.long, "int64": torch.long, "int32": torch.int32, "int": torch.int32,
}  # fmt: skip


def parse_input_dtype(name: str) -> torch.dtype:
    """The dtype `name` (an INPUT_DTYPES key, e.g. float32 or long) stands for; InputShapeError for anything else."""
    dtype = INPUT_DTYPES.get(name.strip().lower())
    if dtype is None:
        raise InputShapeError(f"unknown input dtype {name!r}",
                              f"use one of {', '.join(INPUT_DTYPES)} (long for token ids)")
    return dtype


def is_token_dtype(dtype: torch.dtype) -> bool:
    """Whether inputs of `dtype` are token ids (neither floating nor complex)."""
    return not (dtype.is_floating_point or dtype.is_complex)


def dtype_name(dtype: torch.dtype) -> str:
    """`dtype` as messages spell it: float32, not torch.float32."""
    return str(dtype).removeprefix("torch.")


def _first_embedding(model: nn.Module) -> nn.Embedding | nn.EmbeddingBag | None:
    """The model's first parameterised layer, if it is an embedding (registration order)."""
    for m in model.modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag):
            return m
        if isinstance(m, nn.Linear | nn.modules.conv._ConvNd):
            return None
    return None


def example_input_kind(model: nn.Module, input_dtype: torch.dtype | None = None, vocab_size: int | None = None
                       ) -> tuple[torch.dtype, int | None]:
    """What the example inputs hold: (dtype, vocabulary size for token ids, else None).

    Token ids (an integer dtype) when `input_dtype` is one, when a `vocab_size` is given, or when the model's first
    parameterised layer is an nn.Embedding; their vocabulary is `vocab_size`, else the embedding's number of rows,
    else the model's `vocab_size` attribute or `config.vocab_size` (Hugging Face). Float32 otherwise.
    InputShapeError when token ids are asked for and no vocabulary can be found, or a vocabulary comes with a float
    dtype.
    """
    embedding = _first_embedding(model)
    if vocab_size is not None and vocab_size < 1:
        raise InputShapeError(f"--vocab must be >= 1, got {vocab_size}", "pass the vocabulary size, e.g. --vocab 1000")
    if input_dtype is None:
        input_dtype = torch.long if vocab_size is not None or embedding is not None else torch.float32
    if not is_token_dtype(input_dtype):
        if vocab_size is not None:
            raise InputShapeError(f"--vocab {vocab_size} asks for token ids, but the input dtype is "
                                  f"{dtype_name(input_dtype)}", "drop --input-dtype, or pass --input-dtype long")
        return input_dtype, None
    if vocab_size is None and embedding is not None:
        vocab_size = int(embedding.num_embeddings)
    if vocab_size is None:
        attr = getattr(model, "vocab_size", None) or getattr(getattr(model, "config", None), "vocab_size", None)
        vocab_size = int(attr) if isinstance(attr, int) and attr > 0 else None
    if vocab_size is None:
        raise InputShapeError(f"the example inputs are token ids ({dtype_name(input_dtype)}) but the vocabulary size "
                              "is unknown (the model's first layer is not an nn.Embedding)",
                              "pass it, e.g. --vocab 1000")
    return input_dtype, vocab_size

