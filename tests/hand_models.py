"""Small models with hand-derived symmetry groups (docs/theory.md section 1), shared by the certification and the
gradient/Hessian constraint tests (no tests here).

Deriving the groups by hand keeps those tests independent of the detector. Both models are seeded, so every call
builds the same parameters, and `batch` draws the same inputs (and labels) every time.
"""

import torch
from torch import nn

from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet


def mlp(hidden=6, hidden2=5, dropout=False):
    """Linear-BN-ReLU-Linear-ReLU-Linear (optionally with dropout after the second ReLU)."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden2), nn.ReLU()]
    layers.append(nn.Dropout(0.3) if dropout else nn.Identity())
    layers.append(nn.Linear(hidden2, 3))
    return nn.Sequential(*layers)


def mlp_groups(hidden=6, hidden2=5):
    S = []
    for c in range(hidden):  # rows of the first Linear + bias behind train-mode BN
        S.append(Symmetry("scale", f"scale.0.{c}", (Member("0.weight", 0, (c,)), Member("0.bias", 0, (c,))), layer="0"))
    for c in range(hidden):  # BN affine (A1) / next Linear column (A2)
        S.append(Symmetry("rescale", f"rescale.1.{c}", (Member("1.weight", 0, (c,), "in"),
                                                        Member("1.bias", 0, (c,), "in"),
                                                        Member("3.weight", 1, (c,), "out")), layer="1"))
    for c in range(hidden2):  # second hidden layer row + bias (A1) / last Linear column (A2)
        S.append(Symmetry("rescale", f"rescale.3.{c}", (Member("3.weight", 0, (c,), "in"),
                                                        Member("3.bias", 0, (c,), "in"),
                                                        Member("6.weight", 1, (c,), "out")), layer="3"))
    for j in range(hidden2):  # columns of the classifier, plus its bias
        S.append(Symmetry("translation", f"translation.6.col{j}", (Member("6.weight", 1, (j,)),), layer="6"))
    S.append(Symmetry("translation", "translation.6.bias", (Member("6.bias"),), layer="6"))
    return SymmetrySet(S)


def convnet():
    """Conv-BN-ReLU-Conv-ReLU-MaxPool-Flatten-Linear on 4x4 inputs."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(20, 3))


def convnet_groups():
    S = []
    for c in range(4):
        S.append(Symmetry("scale", f"scale.0.{c}", (Member("0.weight", 0, (c,)), Member("0.bias", 0, (c,))), layer="0"))
        S.append(Symmetry("rescale", f"rescale.1.{c}", (Member("1.weight", 0, (c,), "in"),
                                                        Member("1.bias", 0, (c,), "in"),
                                                        Member("3.weight", 1, (c,), "out")), layer="1"))
    for c in range(5):  # flatten maps channel c to columns 4c..4c+3 of the Linear
        S.append(Symmetry("rescale", f"rescale.3.{c}", (Member("3.weight", 0, (c,), "in"),
                                                        Member("3.bias", 0, (c,), "in"),
                                                        Member("7.weight", 1, tuple(range(4 * c, 4 * c + 4)), "out")),
                          layer="3"))
    for j in range(20):
        S.append(Symmetry("translation", f"translation.7.col{j}", (Member("7.weight", 1, (j,)),), layer="7"))
    S.append(Symmetry("translation", "translation.7.bias", (Member("7.bias"),), layer="7"))
    return SymmetrySet(S)


def batch(kind="mlp", n=16):
    """n seeded inputs for `mlp` (kind "mlp") or `convnet` (any other kind), and n labels in 0..2."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=g) if kind == "mlp" else torch.randn(n, 3, 4, 4, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)
