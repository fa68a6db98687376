"""Shared fixtures for the tracking tests: tiny conv nets with hand-written symmetry sets, a training loop.

(No tests here; the module name only keeps it next to the tests that import it.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet


class BNNet(nn.Module):
    """conv-BN-ReLU-maxpool-conv-BN-ReLU-avgpool-linear: scale (conv channels), rescale (BN -> next), translation."""

    def __init__(self, eps: float = 1e-5, c1: int = 4, c2: int = 6, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1, eps=eps)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2, eps=eps)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.relu(self.bn2(self.conv2(x))).mean(dim=(2, 3))
        return self.fc(x)


class PlainNet(nn.Module):
    """conv-ReLU-maxpool-conv-ReLU-maxpool-flatten-linear (no BN): rescale (with flatten blocks), translation."""

    def __init__(self, c1: int = 4, c2: int = 6, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def translation_groups(fc: str, n_in: int, prefix: str = "") -> list[Symmetry]:
    out = [Symmetry("translation", f"{prefix}{fc}.col{j}", (Member(f"{prefix}{fc}.weight", 1, (j,)),), layer=fc)
           for j in range(n_in)]
    out.append(Symmetry("translation", f"{prefix}{fc}.bias", (Member(f"{prefix}{fc}.bias"),), layer=fc))
    return out


def bn_symmetries(net: BNNet, prefix: str = "") -> SymmetrySet:
    p = prefix
    syms: list[Symmetry] = []
    for conv, bn, nxt in (("conv1", "bn1", "conv2"), ("conv2", "bn2", "fc")):
        n = getattr(net, conv).out_channels
        for c in range(n):
            syms.append(Symmetry("scale", f"{p}{conv}.scale{c}",
                                 (Member(f"{p}{conv}.weight", 0, (c,)), Member(f"{p}{conv}.bias", 0, (c,))),
                                 layer=conv))
            syms.append(Symmetry("rescale", f"{p}{bn}.rescale{c}",
                                 (Member(f"{p}{bn}.weight", 0, (c,), "in"), Member(f"{p}{bn}.bias", 0, (c,), "in"),
                                  Member(f"{p}{nxt}.weight", 1, (c,), "out")), layer=bn))
    syms += translation_groups("fc", net.fc.in_features, p)
    return SymmetrySet(syms)


def plain_symmetries(net: PlainNet) -> SymmetrySet:
    syms: list[Symmetry] = []
    for c in range(net.conv1.out_channels):
        syms.append(Symmetry("rescale", f"conv1.rescale{c}",
                             (Member("conv1.weight", 0, (c,), "in"), Member("conv1.bias", 0, (c,), "in"),
                              Member("conv2.weight", 1, (c,), "out")), layer="conv1"))
    for c in range(net.conv2.out_channels):  # flatten: channel c feeds fc inputs 4c .. 4c + 3
        syms.append(Symmetry("rescale", f"conv2.rescale{c}",
                             (Member("conv2.weight", 0, (c,), "in"), Member("conv2.bias", 0, (c,), "in"),
                              Member("fc.weight", 1, tuple(range(4 * c, 4 * c + 4)), "out")), layer="conv2"))
    syms += translation_groups("fc", net.fc.in_features)
    return SymmetrySet(syms)


def make_data(n_batches: int = 4, batch: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=gen), torch.randint(0, 5, (batch,), generator=gen))
            for _ in range(n_batches)]


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    def f(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup)))

    return f


def train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int, *, start: int = 0,
          clip: float | None = None, sched: torch.optim.lr_scheduler.LRScheduler | None = None,
          on_step: Callable[[int, float], None] | None = None) -> None:
    loss_fn = nn.CrossEntropyLoss()
    for k in range(start, start + steps):
        x, y = data[k % len(data)]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        if on_step is not None:
            on_step(k, float(loss.detach()))
