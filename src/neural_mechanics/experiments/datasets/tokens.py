"""The "tokens" dataset: token sequences for language models, with next-token targets (`loss: next_token`).

    dataset: {name: tokens, path: corpus.txt, seq_len: 64}     # path omitted: the embedded corpus

- `path` omitted: the embedded corpus, scikit-learn's dataset descriptions (`sklearn/datasets/descr/*.rst`, the
  documentation of the data sets bundled with scikit-learn: 14 files of English prose and reStructuredText, 43,055
  bytes in scikit-learn 1.9). They ship with scikit-learn, a dependency, so nothing is downloaded; another
  scikit-learn version may ship other text, so the corpus's size and SHA-256 are recorded in the run's notes.
- a text file (any suffix but .pt and .npy): its bytes, one token per byte (vocabulary 256: no tokenizer to
  download or train, and every text in any encoding is covered);
- `.pt` (a 1-D integer tensor saved with torch.save, loaded with `weights_only=True`) or `.npy` (a 1-D integer
  array, loaded without pickles): already tokenised, vocabulary `vocab_size` (default: the largest id + 1).

The stream is cut at the (1 - test_fraction) point: "train" is the first part, "val" and "test" the rest
(contiguous, so no evaluation text is trained on). Each part is cut into non-overlapping windows of seq_len + 1
tokens, and window i is the example (x, y) = (window[:-1], window[1:]): the inputs and the next token at every
position. Loading is the deterministic, resumable, DDP-sharded loader every dataset uses.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.registry import DataOptions, DatasetInfo

#: One token per byte.
BYTE_VOCAB = 256
TENSOR_SUFFIXES = (".pt", ".npy")


def embedded_corpus() -> tuple[bytes, str]:
    """The embedded corpus (scikit-learn's dataset descriptions, files in sorted order, concatenated) and where it
    came from. The package is located without importing it (importing scikit-learn costs ~1.5 s)."""
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    paths = sorted(p for loc in locations for p in (Path(loc) / "datasets" / "descr").glob("*.rst"))
    if not paths:
        raise DatasetError("the embedded corpus (scikit-learn's sklearn/datasets/descr/*.rst) was not found",
                           "reinstall scikit-learn (`pip install scikit-learn`), or give dataset.path: a text file")
    data = b"".join(p.read_bytes() for p in paths)
    return data, f"scikit-learn's dataset descriptions ({len(paths)} files in {paths[0].parent})"


def read_tokens(path: Path, vocab_size: int | None) -> tuple[Tensor, int, str]:
    """(1-D int64 token ids, vocabulary size, a description) of a text or token file (see the module docstring)."""
    if not path.is_file():
        raise DatasetError(f"no token file at {path}", "give dataset.path: a text file, or a 1-D integer tensor "
                           "saved as .pt (torch.save) or .npy (numpy.save)")
    suffix = path.suffix.lower()
    if suffix not in TENSOR_SUFFIXES:
        data = path.read_bytes()
        return _bytes_to_tokens(data), BYTE_VOCAB, f"{path}: {len(data)} bytes, one token per byte"
    try:
        if suffix == ".pt":
            raw = torch.load(path, map_location="cpu", weights_only=True)
            ids = raw if isinstance(raw, Tensor) else None
        else:
            ids = torch.from_numpy(np.load(path, allow_pickle=False))
    except Exception as exc:  # a corrupt or foreign file
        raise DatasetError(f"cannot read token ids from {path}: {type(exc).__name__}: {exc}",
                           "save a 1-D integer tensor: torch.save(ids, 'x.pt') or numpy.save('x.npy', ids)") from exc
    if ids is None or ids.ndim != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        what = type(raw).__name__ if ids is None else f"a {ids.dtype} tensor of shape {tuple(ids.shape)}"
        raise DatasetError(f"{path} holds {what}, not a 1-D integer tensor of token ids",
                           "save the token ids of the whole corpus as one 1-D integer tensor")
    ids = ids.to(torch.long)
    if ids.numel() and int(ids.min()) < 0:
        raise DatasetError(f"{path} has negative token ids (min {int(ids.min())})", "token ids are 0 .. vocab - 1")
    top = int(ids.max()) + 1 if ids.numel() else 1
    vocab = vocab_size if vocab_size is not None else top
    if top > vocab:
        raise DatasetError(f"{path} has token id {top - 1} but dataset.vocab_size is {vocab}",
                           f"set dataset.vocab_size to at least {top} (or drop it: the largest id + 1)")
    return ids, vocab, f"{path}: {ids.numel()} token ids, vocabulary {vocab}"


def _bytes_to_tokens(data: bytes) -> Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


class TokenWindows(Dataset[tuple[Tensor, Tensor]]):
    """Non-overlapping windows of `seq_len + 1` tokens of a 1-D stream: item i is (w[:-1], w[1:]) for
    w = tokens[i * seq_len : (i + 1) * seq_len + 1]."""

    def __init__(self, tokens: Tensor, seq_len: int):
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max((self.tokens.numel() - 1) // self.seq_len, 0)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        window = self.tokens[start : start + self.seq_len + 1]
        return window[:-1], window[1:]


def build_tokens(split: str, options: DataOptions) -> DatasetInfo:
    """Split `split` of the token stream `options.path` (None: the embedded corpus), in windows of
    `options.seq_len` (see the module docstring)."""
    if options.path is None:
        data, where = embedded_corpus()
        ids, vocab = _bytes_to_tokens(data), BYTE_VOCAB
        if options.vocab_size is not None and options.vocab_size < BYTE_VOCAB:
            raise DatasetError(f"the embedded corpus has one token per byte (vocabulary 256), but dataset.vocab_size "
                               f"is {options.vocab_size}", "drop dataset.vocab_size (or set it >= 256)")
        vocab = options.vocab_size or vocab
        source = (f"tokens: the embedded corpus, {where}: {len(data)} bytes, sha256 "
                  f"{hashlib.sha256(data).hexdigest()[:16]}, one token per byte")
    else:
        ids, vocab, source = read_tokens(options.path, options.vocab_size)
        if options.path.suffix.lower() not in TENSOR_SUFFIXES and options.vocab_size is not None:
            vocab = max(vocab, options.vocab_size)
    cut = int(ids.numel() * (1.0 - options.test_fraction))
    part = ids[:cut] if split == "train" else ids[cut:]
    windows = TokenWindows(part, options.seq_len)
    if len(windows) == 0:
        raise DatasetError(
            f"the {split} part of the token stream has {part.numel()} tokens, fewer than seq_len + 1 = "
            f"{options.seq_len + 1} ({ids.numel()} tokens in all, test_fraction {options.test_fraction})",
            "lower dataset.seq_len, change dataset.test_fraction, or give a longer corpus")
    return DatasetInfo(windows, vocab, (options.seq_len,), "tokens", split,
                       notes=(source, f"tokens {split}: {len(windows)} windows of {options.seq_len} tokens"))
