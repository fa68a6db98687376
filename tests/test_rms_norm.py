"""Hand-written RMS norms (ops/rms_norm.py): `x * rsqrt(mean(x**2, -1, keepdim=True) + eps)` is a normaliser.

The net below is a pre-norm residual MLP written with an RMS norm the way LLaMA and T5 write it (a float32
cast, pow / mean / add / rsqrt / mul, then `weight * x`). Counts are derived by hand; groups are certified
with `certify` on a float64 copy (its eps set to a negligible value, the float32 casts kept in float64).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member
from neural_mechanics.symmetry.utils import working_copy
from test_detect_support import counts

torch.set_num_threads(1)
E_IN, E, H, T, C = 3, 6, 5, 4, 4


class RMSNorm(nn.Module):
    """LlamaRMSNorm's arithmetic; `mode` varies how the statistic is written or used."""

    def __init__(self, mode: str = "llama") -> None:
        super().__init__()
        self.mode = mode
        self.weight = nn.Parameter(torch.ones(E))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parts(x)[0]

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normalised output, the statistic mean(x**2))."""
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        if self.mode == "sqrt_div":
            h = h / torch.sqrt(v + self.variance_epsilon)
        elif self.mode == "t5":  # T5LayerNorm: the statistic of the cast, multiplied into the uncast input
            h = x * torch.rsqrt(v + self.variance_epsilon)
        elif self.mode == "other":  # the statistic of another tensor: not a normaliser
            h = h * torch.rsqrt(h.flip(-1).pow(2).mean(-1, keepdim=True) * 0.5 + self.variance_epsilon)
        else:
            h = h * torch.rsqrt(v + self.variance_epsilon)
        return self.weight * h.to(x.dtype), v


class Net(nn.Module):
    def __init__(self, mode: str = "llama") -> None:
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(E_IN, E)
        self.norm1, self.norm = RMSNorm(mode), RMSNorm(mode)
        self.fc1, self.fc2 = nn.Linear(E, H), nn.Linear(H, E)
        self.head = nn.Linear(E, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.inp(x)
        s = s + self.fc2(torch.relu(self.fc1(self.norm1(s))))
        normed, v = self.norm.parts(s)
        out = self.head(normed.mean(1))
        if self.mode == "leak":  # the statistic reaches the output: it moves with the stream, no normaliser
            out = out + v.mean((1, 2)).unsqueeze(-1)
        return out


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, T, E_IN, generator=torch.Generator().manual_seed(0))


def _certified(m: nn.Module, s, x: torch.Tensor) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    report = certify(m, s, x, sample=None, tol=1e-10)
    assert report.ok, report.summary()


@pytest.mark.parametrize("mode", ["llama", "sqrt_div", "t5"])
def test_rms_norm_is_a_normaliser(x, mode):
    torch.manual_seed(0)
    m = Net(mode)
    s = find_symmetries(m, x)
    # by hand: the stream (written by inp and fc2) is normalised by norm1 and norm and read by nothing else:
    # 1 scale group. norm1.weight[d] writes feature d, read by fc1's column d: E rescale; hidden neuron j
    # through ReLU: H rescale; norm.weight[d] -> (mean over tokens) -> head's column d: E rescale; the head's
    # softmax translations: E columns + the bias. (E + 1, 1, 2 E + H)
    assert counts(s) == (E + 1, 1, 2 * E + H)
    (stream,) = s.filter("scale")
    assert {mm.param for mm in stream.members} == {"inp.weight", "inp.bias", "fc2.weight", "fc2.bias"}
    assert any("RMS norm" in step for step in stream.chain)
    assert set(s["rescale:norm1[2]"].members) == {Member("norm1.weight", 0, (2,), "in"),
                                                  Member("fc1.weight", 1, (2,), "out")}
    assert "aten.pow" not in s.meta["blocked_ops"]
    _certified(m, s, x)


@pytest.mark.parametrize("mode", ["leak", "other"])
def test_not_a_normaliser(x, mode):
    torch.manual_seed(1)
    m = Net(mode)
    s = find_symmetries(m, x)
    # leak: the last norm's statistic reaches the output, so it is not a normaliser there: the stream cannot
    # move (pow is a barrier), norm's own affine still writes. other: norm1 and norm divide by the RMS of a
    # flipped, halved copy: not recognised, a barrier. Either way no scale group; the affine writers stay.
    assert counts(s) == (E + 1, 0, 2 * E + H)
    assert s.meta["blocked_ops"]["aten.pow"] >= 1
    _certified(m, s, x)


def test_working_copy_removes_hugging_face_eps_and_float32_casts(x):
    m = Net().double()
    work, notes = working_copy(m)
    assert work.norm.variance_epsilon == 1e-20 and m.norm.variance_epsilon == 1e-6
    assert any("norm1 (eps 1e-06)" in n for n in notes)
    # the forward keeps float64 through the float32 cast: the normalised rows have RMS 1 to float64 rounding
    seen = []
    for net in (work, m):
        net.norm1.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        work(x.double())
        m(x.double())  # the model itself is untouched: float32 rounding inside its norm
    ours, theirs = ((y / m.norm1.weight.detach()).pow(2).mean(-1).sqrt() for y in seen)
    assert ours.dtype == torch.float64 and float((ours - 1).abs().max()) < 1e-14
    assert float((theirs - 1).abs().max()) > 1e-10
