"""Property tests: random small MLP / conv / residual architectures.

For each drawn architecture the expected group counts follow from the architecture by the rules in
the comments, and every found group must certify (float64, relative change <= 1e-9).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from neural_mechanics.symmetry.detect import find_symmetries
from test_detect_support import certify_groups, counts

torch.set_num_threads(1)

ACTS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh}
HOMOGENEOUS = {"relu", "leaky"}
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

layer = st.tuples(st.integers(1, 5), st.booleans(), st.sampled_from(sorted(ACTS)))


def _normalisers_see_variation(model: nn.Module, x: torch.Tensor, floor: float = 1e-8) -> bool:
    """True when every train-mode BatchNorm channel gets a non-constant input over the batch (float64).

    A channel whose input is constant (e.g. dead ReLUs upstream: the linear layer's output is its bias for
    every sample) is 0/0 at eps -> 0: (x - mean) is float rounding and the scale action rescales the
    rounding, so no certification can hold there. That is a degenerate input, not a wrong group.
    """
    variances: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        h = args[0]
        variances.append(h.transpose(0, 1).reshape(h.shape[1], -1).var(dim=1, unbiased=False))

    m = copy.deepcopy(model).double()
    norms = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    handles = [mod.register_forward_pre_hook(hook) for mod in norms]
    with torch.no_grad():
        m(x.double())
    for h in handles:
        h.remove()
    return all(bool((v > floor).all()) for v in variances)


def _counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    assume(_normalisers_see_variation(model, x))
    s = find_symmetries(model, x)
    certify_groups(model, s, x)
    return counts(s)


@SETTINGS
@given(layers=st.lists(layer, min_size=1, max_size=3), n_in=st.integers(1, 4), n_out=st.integers(2, 4),
       seed=st.integers(0, 2**16))
def test_random_mlps(layers, n_in, n_out, seed):
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    scale = rescale = 0
    width = n_in
    for w, bn, act in layers:
        mods.append(nn.Linear(width, w))
        if bn:
            mods.append(nn.BatchNorm1d(w))
        mods.append(ACTS[act]())
        scale += w if bn else 0  # Linear rows+bias normalised per neuron by train BN
        rescale += w if act in HOMOGENEOUS else 0  # writer (Linear or BN affine) -> act -> next columns
        width = w
    mods.append(nn.Linear(width, n_out))
    model = nn.Sequential(*mods)
    x = torch.randn(16, n_in)
    assert _counts(model, x) == (width + 1, scale, rescale)


@SETTINGS
@given(layers=st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.sampled_from(sorted(ACTS)), st.booleans()),
                       min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_random_convnets(layers, seed):
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    scale = rescale = 0
    width = 2
    for c, bn, act, pool in layers:
        mods.append(nn.Conv2d(width, c, 3, padding=1))
        if bn:
            mods.append(nn.BatchNorm2d(c))
        mods.append(ACTS[act]())
        if pool:
            mods.append(nn.MaxPool2d(2))
        scale += c if bn else 0
        rescale += c if act in HOMOGENEOUS else 0  # max-pooling and the global average keep the channel
        width = c
    mods += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)]
    model = nn.Sequential(*mods)
    x = torch.randn(3, 2, 8, 8)
    assert _counts(model, x) == (width + 1, scale, rescale)


class Residual(nn.Module):
    """h = stem(x); per block h = h + out_b(act_b([BN_b](in_b(h)))); logits = head(act_f(h))."""

    def __init__(self, n_in: int, width: int, blocks: list[tuple[int, bool, str]], final: str) -> None:
        super().__init__()
        self.stem = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, u), *([nn.BatchNorm1d(u)] if bn else []), ACTS[act](), nn.Linear(u, width))
            for u, bn, act in blocks
        )
        self.act = ACTS[final]()
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(self.act(h))


@SETTINGS
@given(width=st.integers(1, 4), blocks=st.lists(layer, min_size=1, max_size=3),
       final=st.sampled_from(sorted(ACTS)), seed=st.integers(0, 2**16))
def test_random_residual_mlps(width, blocks, final, seed):
    torch.manual_seed(seed)
    model = Residual(3, width, blocks, final)
    x = torch.randn(16, 3)
    # inside each block: scale u if BN, rescale u if the activation is homogeneous; the stream: one class
    # per channel tying stem and every block's output layer (writers) to every block's input layer and
    # the head (readers) - a rescale group per channel iff the final activation is homogeneous.
    scale = sum(u for u, bn, _ in blocks if bn)
    rescale = sum(u for u, _, act in blocks if act in HOMOGENEOUS) + (width if final in HOMOGENEOUS else 0)
    assert _counts(model, x) == (width + 1, scale, rescale)
