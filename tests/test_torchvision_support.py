"""The torchvision classification zoo as test data: how each model is built, fed and certified (no tests here).

`specs()` says, per model of `torchvision.models.list_models(module=torchvision.models)`, which constructor
arguments and input size the whole-list test uses, and which models are skipped and why.
`scripts/torchvision_counts.py` writes docs/torchvision_counts.md from the same specs; the whole-list test
(test_torchvision_zoo.py) checks the detector's counts against the hand derivations of tests/zoo_expectations.py
(and the table against both), or, for a model without a derivation, against the table (a regression snapshot).

Choices (documented in docs/torchvision_counts.md):
- num_classes=10 everywhere (the classifier is the one place where the class count enters; translation
  counts depend on the classifier's input width, not on the class count);
- the smallest input the architecture accepts, batch 2 (train-mode BatchNorm needs > 1 value per channel);
  ViT is built for that image size (`image_size=`), which changes only the number of patches;
- GoogLeNet and Inception v3 are built with their auxiliary heads and analysed in train mode, where they
  return (logits, aux logits...): the loss is torchvision's training recipe, a softmax loss on every head
  (`aux_softmax_loss`); by default `find_symmetries` uses the main logits only (see test_torchvision_families).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

DOC = Path(__file__).resolve().parents[1] / "docs" / "torchvision_counts.md"


def aux_softmax_loss(out: Any) -> Tensor:
    """sum_h sum(log_softmax(logits_h, dim=1)) over the main and auxiliary heads (a tuple output)."""
    heads = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, Tensor)]
    return sum((F.log_softmax(h, dim=1).sum() for h in heads), torch.zeros((), dtype=heads[0].dtype))


def randomize_zeros(model: nn.Module, std: float = 0.02) -> nn.Module:
    """Give every all-zero parameter small random values (in place), so that certification is not vacuous.

    torchvision zero-initialises some classifiers (ViT's head, Swin/ConvNeXt biases, ...): with a zero head
    the logits are constant and every action trivially leaves the loss unchanged. Symmetries hold for every
    theta, so any values will do; detection does not depend on them.
    """
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@dataclass(frozen=True)
class Spec:
    """How one torchvision model is built and fed in the whole-list test."""

    name: str
    size: int = 32
    kwargs: dict[str, Any] = field(default_factory=dict)
    skip: str = ""
    """Non-empty: the reason the model is not run (too large for the machine)."""

    @property
    def loss(self) -> str | Callable[[Any], Tensor]:
        return aux_softmax_loss if self.kwargs.get("aux_logits") else "cross_entropy"

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        model = torchvision.models.get_model(self.name, num_classes=10, **self.kwargs)
        return randomize_zeros(model).train()

    def n_params(self) -> int:
        """Parameter count, from a model built on the meta device (no memory, no initialisation)."""
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(self.name, num_classes=10, **self.kwargs)
        except NotImplementedError:  # builders that compute widths with tensors (RegNet): count on the CPU
            model = torchvision.models.get_model(self.name, num_classes=10, **self.kwargs)
        return sum(p.numel() for p in model.parameters())

    def memory_gb(self) -> float:
        """Peak memory estimate of the whole-list test: float32 weights + float64 copy + moved parameters."""
        return self.n_params() * BYTES_PER_PARAM / 1e9

    def inputs(self) -> Tensor:
        return torch.randn(2, 3, self.size, self.size, generator=torch.Generator().manual_seed(1))


BYTES_PER_PARAM = 28
"""4 (float32 model) + 8 (float64 copy for certification, holding the generic point) + 8 (the acted-on parameters
of one action) + 8 (its decoy baseline, a random move of the same coordinates)."""


def available_gb() -> float:
    """MemAvailable from /proc/meminfo (inf where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("inf")


TOO_LARGE = ("{n}M parameters: float32 weights, the float64 copy certification needs, one moved copy and its "
             "baseline (~{gb:.0f} GB) do not fit next to the rest of the suite on a 7 GB CI runner")


def _spec(name: str) -> Spec:
    if name.startswith("vit_"):
        size = 28 if name == "vit_h_14" else 32
        spec = Spec(name, size, {"image_size": size})
    elif name == "maxvit_t":
        spec = Spec(name, 224)  # every stage must tile into 7 x 7 partitions: 224 = 32 * 7
    elif name == "alexnet":
        spec = Spec(name, 64)
    elif name == "inception_v3":
        spec = Spec(name, 299, {"aux_logits": True, "init_weights": True})  # the aux head's 5x5 conv needs 299
    elif name == "googlenet":
        spec = Spec(name, 32, {"aux_logits": True, "init_weights": True})
    else:
        spec = Spec(name)
    params = LARGE.get(name)
    if params is not None:
        spec = Spec(spec.name, spec.size, spec.kwargs, TOO_LARGE.format(n=params, gb=params * BYTES_PER_PARAM / 1000))
    return spec


LARGE = {"regnet_y_128gf": 645, "vit_h_14": 633}
"""Models skipped, with their parameter count in millions (num_classes=10)."""


def all_names() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


def specs() -> list[Spec]:
    return [_spec(n) for n in all_names()]


# ---- the counts table ----------------------------------------------------------------------------
HEADER = "| model | input | parameters | translation | scale | rescale | expected counts | blocked ops |"
RULE = "|---|---|---|---:|---:|---:|---|---|"
ROW = re.compile(r"^\| `(?P<model>[a-z0-9_]+)` \| (?P<input>[^|]+) \| (?P<params>[^|]+) \| (?P<t>\d+) \| "
                 r"(?P<s>\d+) \| (?P<r>\d+) \|(?: (?P<expected>derived|derived \(gap\)|snapshot) \|)?")
EXPECTED = ("derived", "derived (gap)", "snapshot")
"""Values of the `expected counts` column (see tests/zoo_expectations.py `provenance`)."""


def table_row(spec: Spec, n_params: int, counts: dict[str, int] | tuple[int, int, int], blocked: dict[str, int] | str,
              expected: str) -> str:
    """One row of docs/torchvision_counts.md (counts as a dict by kind or a (translation, scale, rescale) tuple;
    blocked ops as the detector's dict or the column's text)."""
    t, s, r = (counts["translation"], counts["scale"], counts["rescale"]) if isinstance(counts, dict) else counts
    ops = blocked if isinstance(blocked, str) else ", ".join(
        f"{k.removeprefix('aten.')} x{v}" for k, v in sorted(blocked.items()))
    assert expected in EXPECTED, expected
    size = f"2x3x{spec.size}x{spec.size}"
    return f"| `{spec.name}` | {size} | {n_params / 1e6:.1f}M | {t} | {s} | {r} | {expected} | {ops} |"


def read_table(path: Path = DOC) -> dict[str, tuple[int, int, int]]:
    """model -> (translation, scale, rescale) as recorded in docs/torchvision_counts.md."""
    out = {}
    for line in path.read_text().splitlines():
        m = ROW.match(line)
        if m:
            out[m["model"]] = (int(m["t"]), int(m["s"]), int(m["r"]))
    return out


def read_expected(path: Path = DOC) -> dict[str, str | None]:
    """model -> the `expected counts` column ("derived", "derived (gap)", "snapshot"; None if the row has none)."""
    return {m["model"]: m["expected"] for m in map(ROW.match, path.read_text().splitlines()) if m}
