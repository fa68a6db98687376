"""The translation engine through every op the op-rule table lets a softmax shift pass (and a few it must stop).

Each model is a writer whose output z reaches a softmax loss through one op. Adding alpha to column j of
the writer's weight adds alpha * x_j to every channel of z, and adding alpha to the bias adds alpha to
every channel: a shift constant along the class axis. When the op keeps such a shift constant along the
axis the softmax normalises, the writer has one translation group per input feature plus one for the bias
(Linear(4, 6): 4 + 1 = 5; Conv2d(3, 6, 1): 3 + 1 = 4); when it does not (a constant or another tensor
concatenated or padded along the class axis, which the shift does not reach), it has none. Every group
found is certified by brute force (test_detect_support.certify_groups).

These ops were stopped by the translation engine before the op-rule table unified its op sets with the
channel rules' (its index maps were a subset of the channel rules', its casts and pools too): the cases
marked "new" gave 0 groups before.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neural_mechanics.symmetry.detect import find_symmetries
from test_detect_support import certify_groups

torch.set_num_threads(1)


class Head(nn.Module):
    """Linear(4, 6) -> f -> logits (N, C)."""

    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(4, 6)
        self.register_buffer("const", torch.randn(3, 2))
        self.f = f

    def forward(self, x):
        return self.f(self, self.head(x))


class ConvHead(nn.Module):
    """Conv2d(3, 6, 1) -> f -> mean over space -> logits (N, 6)."""

    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, 6, 1)
        self.f = f

    def forward(self, x):
        return self.f(self, self.head(x)).mean((2, 3))


LINEAR_CASES = {
    # new: copies and sign flips carry the shift (positive, neg, type_as, an inactive dropout of either kind)
    "positive": (lambda m, z: +z, 5),
    "neg": (lambda m, z: -z, 5),
    "type_as": (lambda m, z: z.type_as(z), 5),
    "true_divide": (lambda m, z: torch.true_divide(z, 2.0), 5),
    "dropout_p0_train": (lambda m, z: F.dropout(z, 0.0, training=True), 5),
    "feature_dropout_p0": (lambda m, z: F.dropout1d(z.unsqueeze(-1), 0.0, training=True).squeeze(-1), 5),
    # new: index maps that keep the class axis whole (or cut it, which keeps the shift constant along it)
    "slice": (lambda m, z: z[:, :5], 5),
    "narrow": (lambda m, z: z.narrow(1, 1, 4), 5),
    "flip": (lambda m, z: z.flip(1), 5),
    "roll": (lambda m, z: z.roll(2, 1), 5),
    "repeat": (lambda m, z: z.repeat(1, 2), 5),
    "cat_self": (lambda m, z: torch.cat([z, z], 1), 5),
    "cat_batch": (lambda m, z: torch.cat([z, m.const.repeat(1, 3)], 0), 5),
    "stack_sum": (lambda m, z: torch.stack([z, 2 * z], 0).sum(0), 5),
    "select": (lambda m, z: z.view(-1, 2, 3)[:, 0], 5),
    "moveaxis": (lambda m, z: z.view(-1, 1, 6).moveaxis(1, 2).flatten(1), 5),
    "chunk": (lambda m, z: z.chunk(2, 1)[0], 5),
    "split": (lambda m, z: torch.split(z, [2, 4], 1)[1], 5),
    "unbind_add": (lambda m, z: sum(torch.unbind(z.view(-1, 2, 3), 1)), 5),
    "reflect_pad": (lambda m, z: F.pad(z.unsqueeze(0), (1, 1), mode="reflect")[0], 5),
    # stopped: part of the class axis does not shift (a constant or another input), so the softmax sees it
    "cat_constant_classes": (lambda m, z: torch.cat([z, m.const], 1), 0),
    "zero_pad_classes": (lambda m, z: F.pad(z, (0, 2)), 0),
    "one_pad_classes": (lambda m, z: F.pad(z, (0, 1), value=1.0), 0),
    "relu": (lambda m, z: F.relu(z), 0),
    "int_cast": (lambda m, z: z.to(torch.int64).to(z.dtype), 0),
    "floor_division": (lambda m, z: torch.div(z, 0.5, rounding_mode="floor"), 0),
}

CONV_CASES = {
    # new: linear interpolations (fixed weights summing over space, the same for every channel)
    "bicubic": (lambda m, z: F.interpolate(z, scale_factor=2, mode="bicubic"), 4),
    "nearest_exact": (lambda m, z: F.interpolate(z, scale_factor=2, mode="nearest-exact"), 4),
    "bilinear_antialias": (lambda m, z: F.interpolate(z, scale_factor=0.5, mode="bilinear", antialias=True), 4),
    # new: channel permutations
    "channel_shuffle": (lambda m, z: F.channel_shuffle(z, 2), 4),
    "pixel_shuffle": (lambda m, z: F.pixel_shuffle(z.repeat(1, 4, 1, 1), 2), 4),
    # stopped: a max pool is not linear; pixel_unshuffle stacks different positions (different shifts) as channels
    "max_pool": (lambda m, z: F.max_pool2d(z, 2), 0),
    "pixel_unshuffle": (lambda m, z: F.pixel_unshuffle(z, 2), 0),
}


def _check(model: nn.Module, x: torch.Tensor, expected: int) -> None:
    s = find_symmetries(model, x)
    groups = [g for g in s if g.kind == "translation"]
    assert len(groups) == expected, s.details()
    assert all(m.param.startswith("head.") for g in groups for m in g.members)
    if groups:
        certify_groups(model, groups, x)


@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_linear_head_through_op(case):
    f, expected = LINEAR_CASES[case]
    _check(Head(f), torch.randn(3, 4, generator=torch.Generator().manual_seed(1)), expected)


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_head_through_op(case):
    f, expected = CONV_CASES[case]
    _check(ConvHead(f), torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1)), expected)


class KeyPath(nn.Module):
    """Single-head attention whose keys pass one op `f`; the tokens' mean feeds a Linear(4, 3) classifier."""

    def __init__(self, f):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.f = f

    def forward(self, x):
        y = F.scaled_dot_product_attention(self.q(x), self.f(self.k(x)), self.v(x))
        return self.out(y.mean(1))


@pytest.mark.parametrize("case", ["neg", "positive", "type_as", "identity"])
def test_key_bias_through_op(case):
    """k + b shifts every score of a query by q . b (constant over keys): one group per coordinate of k.bias.

    -(k + b) = -k - b and casts/copies of it shift the same way, so each of the 4 coordinates stays a group
    ("identity" is the reference: the keys as they are).
    """
    f = {"neg": lambda t: -t, "positive": lambda t: +t, "type_as": lambda t: t.type_as(t), "identity": lambda t: t}
    model = KeyPath(f[case])
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    s = find_symmetries(model, x)
    key_bias = [g for g in s if g.kind == "translation" and g.members[0].param == "k.bias"]
    assert sorted(g.name for g in key_bias) == [f"translation:k.bias[{j}]" for j in range(4)]
    certify_groups(model, key_bias, x)
