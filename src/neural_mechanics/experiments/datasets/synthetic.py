"""The "synthetic" dataset: seeded data of any input shape, dtype and class count, generated per index on the fly
(no files, no download), for tests, benchmarks and trying a model before its data exists.

Config keys: `input_shape` (one example, default 3x32x32), `dtype` (float32, float64, or long for token ids below
`vocab_size`, default 64), `num_classes` (default 10), `num_samples` (default 512 for train, 128 otherwise) and
`targets`, what each example's target is:

| targets      | dtype  | example (x, y)                                                                          |
|--------------|--------|-----------------------------------------------------------------------------------------|
| `class`      | float  | x = mu_y + eps: a class prototype plus Gaussian noise; y a class (`SyntheticImages`)   |
| `class`      | long   | x = the class's prototype token sequence, each token replaced by a uniform one w.p. 1/2 |
| `pixel`      | float  | x of shape (C, *S): x[:, p] = mu_{y[p]} + eps[:, p] with a blocky label map y (S)       |
| `regression` | float  | y = W x / sqrt(dim x) + 0.1 eps, W a fixed Gaussian (num_classes x dim x) matrix        |
| `next_token` | long   | a walk of a fixed random Markov chain (two successors per token), y = x shifted by one  |

Prototypes and matrices depend only on the seed; the noise and the labels on (seed, split, index), so train and
test are different draws from the same distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.loaders import mix_seed
from neural_mechanics.experiments.datasets.registry import SPLITS, DataOptions, DatasetInfo

#: The vocabulary of synthetic token ids when `vocab_size` is not given.
DEFAULT_VOCAB = 64
#: The side of a label-map block of `targets: pixel` (labels are constant on BLOCK x BLOCK squares).
BLOCK = 4
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "long": torch.long}
#: Which targets each dtype supports.
TARGETS_FOR_DTYPE = {"float32": ("class", "pixel", "regression"), "float64": ("class", "pixel", "regression"),
                     "long": ("class", "next_token")}


class _Seeded(Dataset[tuple[Tensor, object]]):
    """Per-index generators: `_gen(stream, index)` is seeded by (seed, stream, split, index)."""

    def __init__(self, num_samples: int, input_shape: Sequence[int], num_classes: int, seed: int, split: str):
        if num_samples < 1 or num_classes < 1 or not input_shape or any(s < 1 for s in input_shape):
            raise DatasetError(
                f"synthetic dataset needs positive sizes, got num_samples={num_samples}, "
                f"input_shape={tuple(input_shape)}, num_classes={num_classes}",
                "pass e.g. num_samples=512, input_shape=(3, 32, 32), num_classes=10",
            )
        self.num_samples = num_samples
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = num_classes
        self.seed = seed
        self.split_id = SPLITS.index(split)

    def __len__(self) -> int:
        return self.num_samples

    def _fixed(self, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, stream))

    def _gen(self, stream: int, index: int) -> torch.Generator:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return torch.Generator().manual_seed(mix_seed(self.seed, stream, self.split_id, index))


class SyntheticImages(_Seeded):
    """Seeded class-dependent Gaussian patterns: x_i = signal * mu_{y_i} + noise * eps_i, y_i = perm(i) mod K.

    The class prototypes mu_k ~ N(0, I) depend only on `seed`; eps_i ~ N(0, I) and the labels depend on
    (seed, split, i), so train and test are different draws from the same distribution.
    """

    def __init__(self, num_samples: int, input_shape: Sequence[int], num_classes: int, *, seed: int = 0,
                 split: str = "train", signal: float = 1.0, noise: float = 1.0, dtype: torch.dtype = torch.float32):
        super().__init__(num_samples, input_shape, num_classes, seed, split)
        self.signal, self.noise, self.dtype = signal, noise, dtype
        self.prototypes = torch.randn((num_classes, *self.input_shape), generator=self._fixed(1_000_003))
        label_gen = torch.Generator().manual_seed(mix_seed(seed, 2_000_003, self.split_id))
        self.labels = (torch.randperm(num_samples, generator=label_gen) % num_classes).tolist()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        gen = self._gen(3_000_017, index)
        label = int(self.labels[index])
        eps = torch.randn(self.input_shape, generator=gen)
        return (self.signal * self.prototypes[label] + self.noise * eps).to(self.dtype), label


class SyntheticSegmentation(_Seeded):
    """Per-position classes: a label map y of shape S (constant on BLOCK x ... blocks, uniform classes) and
    x[:, p] = mu_{y[p]} + eps[:, p] for input shape (C, *S), class prototypes mu_k ~ N(0, I_C)."""

    def __init__(self, num_samples: int, input_shape: Sequence[int], num_classes: int, *, seed: int = 0,
                 split: str = "train", dtype: torch.dtype = torch.float32):
        super().__init__(num_samples, input_shape, num_classes, seed, split)
        if len(self.input_shape) < 2:
            raise DatasetError(f"targets: pixel needs inputs (C, *positions), got input_shape {self.input_shape}",
                               "e.g. input_shape: [3, 16, 16] (a label per pixel of 16x16 images)")
        self.dtype = dtype
        self.prototypes = torch.randn((num_classes, self.input_shape[0]), generator=self._fixed(4_000_037))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        gen = self._gen(5_000_011, index)
        spatial = self.input_shape[1:]
        coarse = torch.randint(0, self.num_classes, tuple(math.ceil(s / BLOCK) for s in spatial), generator=gen)
        labels = coarse
        for dim, size in enumerate(spatial):
            labels = labels.repeat_interleave(BLOCK, dim=dim).narrow(dim, 0, size)
        eps = torch.randn(self.input_shape, generator=gen)
        x = self.prototypes[labels].movedim(-1, 0) + eps
        return x.to(self.dtype), labels.contiguous()


class SyntheticRegression(_Seeded):
    """y = W x / sqrt(D) + 0.1 eps' with x ~ N(0, I) of shape input_shape (D elements) and a fixed Gaussian W of
    shape (num_classes, D): a linear-Gaussian regression problem with num_classes outputs."""

    def __init__(self, num_samples: int, input_shape: Sequence[int], num_classes: int, *, seed: int = 0,
                 split: str = "train", dtype: torch.dtype = torch.float32):
        super().__init__(num_samples, input_shape, num_classes, seed, split)
        self.dtype = dtype
        dim = math.prod(self.input_shape)
        self.weight = torch.randn((num_classes, dim), generator=self._fixed(6_000_101)) / math.sqrt(dim)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        gen = self._gen(7_000_003, index)
        x = torch.randn(self.input_shape, generator=gen)
        y = self.weight @ x.flatten() + 0.1 * torch.randn(self.num_classes, generator=gen)
        return x.to(self.dtype), y.to(self.dtype)


class SyntheticTokenClasses(_Seeded):
    """Token ids: class k has a prototype sequence P_k (uniform ids, fixed by the seed); an example of class y is
    P_y with each position replaced, with probability 1/2, by a uniform id. y_i = perm(i) mod K."""

    def __init__(self, num_samples: int, input_shape: Sequence[int], num_classes: int, vocab_size: int, *,
                 seed: int = 0, split: str = "train"):
        super().__init__(num_samples, input_shape, num_classes, seed, split)
        self.vocab_size = vocab_size
        self.prototypes = torch.randint(0, vocab_size, (num_classes, *self.input_shape), generator=self._fixed(8_009))
        label_gen = torch.Generator().manual_seed(mix_seed(seed, 9_001, self.split_id))
        self.labels = (torch.randperm(num_samples, generator=label_gen) % num_classes).tolist()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        gen = self._gen(10_007, index)
        label = int(self.labels[index])
        noise = torch.randint(0, self.vocab_size, self.input_shape, generator=gen)
        keep = torch.rand(self.input_shape, generator=gen) < 0.5
        return torch.where(keep, self.prototypes[label], noise), label


class SyntheticMarkovTokens(_Seeded):
    """Walks of a fixed random Markov chain over the vocabulary: every token has two successors (uniform ids fixed
    by the seed), taken with probability 1/2 each; the walk starts at a uniform id. For input_shape (T,): x is the
    first T tokens of a walk of T + 1, y the last T (the next token at every position)."""

    def __init__(self, num_samples: int, input_shape: Sequence[int], vocab_size: int, *, seed: int = 0,
                 split: str = "train"):
        super().__init__(num_samples, input_shape, vocab_size, seed, split)
        if len(self.input_shape) != 1:
            raise DatasetError(f"targets: next_token needs input_shape [T] (one sequence), got {self.input_shape}",
                               "e.g. input_shape: [32]")
        self.successors = torch.randint(0, vocab_size, (vocab_size, 2), generator=self._fixed(11_003))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        gen = self._gen(12_011, index)
        (length,) = self.input_shape
        choices = torch.randint(0, 2, (length,), generator=gen).tolist()
        walk = [int(torch.randint(0, self.num_classes, (), generator=gen))]
        for c in choices:
            walk.append(int(self.successors[walk[-1], c]))
        seq = torch.tensor(walk, dtype=torch.long)
        return seq[:-1], seq[1:]


def build_synthetic(split: str, options: DataOptions) -> DatasetInfo:
    """`options.num_samples` examples (default 512 for train, 128 otherwise) of shape `options.input_shape` and
    dtype `options.dtype`, with `options.targets` targets over `options.num_classes` classes (see the table above)."""
    n = options.num_samples if options.num_samples is not None else (512 if split == "train" else 128)
    dtype, targets, shape, k = options.dtype, options.targets, options.input_shape, options.num_classes
    if targets not in TARGETS_FOR_DTYPE[dtype]:
        raise DatasetError(f"synthetic targets {targets!r} need another input dtype than {dtype}",
                           f"with dtype {dtype} use targets {' or '.join(TARGETS_FOR_DTYPE[dtype])}")
    vocab = options.vocab_size if options.vocab_size is not None else DEFAULT_VOCAB
    classes: tuple[str, ...] = tuple(str(i) for i in range(k))
    ds: _Seeded
    if targets == "next_token":
        ds, k, classes = SyntheticMarkovTokens(n, shape, vocab, seed=options.seed, split=split), vocab, ()
    elif dtype == "long":
        ds = SyntheticTokenClasses(n, shape, k, vocab, seed=options.seed, split=split)
    elif targets == "pixel":
        ds = SyntheticSegmentation(n, shape, k, seed=options.seed, split=split, dtype=_DTYPES[dtype])
    elif targets == "regression":
        ds, classes = SyntheticRegression(n, shape, k, seed=options.seed, split=split, dtype=_DTYPES[dtype]), ()
    else:
        ds = SyntheticImages(n, shape, k, seed=options.seed, split=split, dtype=_DTYPES[dtype])
    return DatasetInfo(ds, k, ds.input_shape, "synthetic", split, classes)
