"""Hugging Face / timm models as test data: tiny configs, token batches, certification at a generic point (no tests).

Models are built from configs with random weights (never downloaded). Each tiny config is stated where it is
built, and the test that uses it derives its counts by hand from that config.

Certification (`certified`): symmetries hold at every parameter value, so the groups are certified at a
generic point, the model's parameters plus a seeded random perturbation of every parameter (zero-initialised
ones included) of 0.3 times the larger of its RMS and 0.1; with `nm.certify` on a float64 copy (eps negligible,
the model's float32 casts kept in float64) and a tolerance of 1e-10: a real group gives ~1e-15, while a wrong
group (`assert_rejected`) changes the loss or the logits by many orders of magnitude more.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.certify import CertificationReport, certify
from neural_mechanics.symmetry.groups import Symmetry, SymmetrySet
from neural_mechanics.symmetry.loss import LossLike, LossSpec

TOKENS = LossSpec.cross_entropy(class_dim=-1)
"""Token-level cross-entropy: the softmax over the vocabulary axis of (B, T, V) logits."""

VOCAB, SEQ = 50, 8
SPECIAL = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
"""Special tokens inside the tiny vocabulary (the defaults point past it and make transformers warn)."""


def tokens(batch: int = 2, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> Tensor:
    """A seeded batch of token ids in [3, vocab) (no special tokens, so no padding mask)."""
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def generic_point(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter in place: p += 0.3 * max(rms(p), 0.1) * N(0, 1) (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            rms = float(p.detach().double().pow(2).mean().sqrt()) if p.numel() else 0.0
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.3 * max(rms, 0.1))
    return model


def certified(model: nn.Module, groups: Iterable[Symmetry], inputs: Any, loss: LossLike = TOKENS,
              sample: int | None = 24, tol: float = 1e-10) -> CertificationReport:
    """Certify `groups` at a generic point of (a copy of) `model`; assert that every action passed."""
    work = generic_point(copy.deepcopy(model))
    report = certify(work, list(groups), inputs, loss=loss, sample=sample, tol=tol)
    assert report.ok, report.summary()
    return report


def assert_rejected(model: nn.Module, wrong: Symmetry, inputs: Any, loss: LossLike = TOKENS) -> float:
    """A wrong group fails certification at the generic point by far (returns its relative change)."""
    work = generic_point(copy.deepcopy(model))
    report = certify(work, [wrong], inputs, loss=loss, sample=None, tol=1e-10)
    (result,) = report.results
    change = max(v for v in (result.rel_loss_change, result.rel_output_change) if v == v)
    assert not result.passed and change > 1e-6, f"{wrong.name} was not rejected: {report.summary()}"
    return change


def params_of(groups: Iterable[Symmetry], role: str | None = "any") -> set[str]:
    """Parameter names in the groups (role "in", "out", None for scale members, "any" for all)."""
    return {m.param for g in groups for m in g.members if role == "any" or m.role == role}


def by_layer(s: SymmetrySet, kind: str, layer_prefix: str) -> list[Symmetry]:
    return [g for g in s.filter(kind) if g.layer.startswith(layer_prefix)]
