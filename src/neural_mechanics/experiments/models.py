"""The networks the paper trains, a small demo network, and a registry of named presets.

Why these exact networks: the Neural Mechanics experiments (Kunin et al., ICLR 2021) measure
per-channel norms, per-neuron rescale charges and per-layer translation sums of a VGG-16 with and
without BatchNorm. Which symmetries exist depends on the fine print of the architecture (a conv
bias before BatchNorm is a translation-and-scale-invariant parameter; a dropout layer between two
linear layers keeps the rescale symmetry; no bias in a layer removes a member from a group), so the
VGG here mirrors the authors' code base line for line:

    github.com/danielkunin/neural-mechanics, models/tinyimagenet_vgg.py (itself derived from
    github.com/weiaicunzai/pytorch-cifar100 via Tanaka et al.'s SynFlow code).

That file's architecture: the VGG cfg table ("A"/"B"/"D"/"E" = VGG-11/13/16/19) of 3x3 convs with
padding 1 and bias, each optionally followed by BatchNorm2d, then ReLU; 2x2 max pools; flatten; a
classifier Linear(d, d/2)-ReLU-Dropout(0.5)-Linear(d/2, d/2)-ReLU-Dropout(0.5)-Linear(d/2, classes)
with d = 512 * (input_size / 32)^2 (their code hard-codes d = 2048 for Tiny ImageNet's 64x64 and
d = 512 for CIFAR's 32x32, which is this formula); Kaiming-normal (fan_out, ReLU) conv weights, zero
biases, BatchNorm weight 1 / bias 0, Linear weights N(0, 0.01^2).

The digits networks are a VGG-shaped miniature for 1x8x8 scikit-learn digits, small enough that a
few hundred SGD steps run in seconds on two CPU cores, with the same symmetry structure (conv bias
before BN, BN scale groups, rescale across ReLU in the classifier).

`llama-tiny` is a LLaMA-style language model at toy size (experiments/llama.py), for language-model runs on the
embedded corpus.

Presets are data (`ModelPreset`, a frozen dataclass) in a registry; `list_presets()` lists them and
`get_preset(name)` looks one up. Model specs (`torchvision:NAME`, `module:factory`, preset names)
are resolved in `neural_mechanics.experiments.specs`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from torch import Tensor, nn

from neural_mechanics.errors import ModelSpecError
from neural_mechanics.experiments.llama import tiny_llama

# -- VGG ---------------------------------------------------------------------------------------

#: Conv widths and max pools ("M") per VGG depth, as in Simonyan & Zisserman's configs A/B/D/E.
VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip


def make_vgg_features(cfg: Sequence[int | str], *, batch_norm: bool, in_channels: int = 3) -> nn.Sequential:
    """The convolutional trunk: per int c, Conv2d(prev, c, 3, padding=1, bias=True) [+ BatchNorm2d(c)] + ReLU;
    per "M", MaxPool2d(2, 2)."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        assert isinstance(item, int)
        layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU(inplace=True))
        channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG as in the Neural Mechanics code base: `features` (conv trunk), flatten, `classifier`.

    classifier = Linear(d, d/2)-ReLU-Dropout(p)-Linear(d/2, d/2)-ReLU-Dropout(p)-Linear(d/2, num_classes),
    where d = feature_dim (the flattened trunk output, 512 * (input_size / 32)^2 for the standard cfgs).
    """

    def __init__(
        self,
        features: nn.Sequential,
        num_classes: int,
        feature_dim: int,
        dropout: float = 0.5,
        input_shape: tuple[int, ...] | None = None,
    ):
        super().__init__()
        #: one example's shape (C, H, W), read by `experiments.specs` to build example inputs
        self.input_shape = input_shape
        self.features = features
        hidden = feature_dim // 2
        self.classifier = nn.Sequential(
            nn.Linear(feature_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        self._initialize_weights()

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(x)
        out = out.view(out.size(0), -1)
        return self.classifier(out)

    def _initialize_weights(self) -> None:
        """Kaiming-normal (fan_out, ReLU) convs, zero biases, BN (1, 0), Linear N(0, 0.01^2) - as the reference."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def vgg(
    depth: int | str = 16,
    num_classes: int = 200,
    input_size: int = 64,
    batch_norm: bool = True,
    *,
    in_channels: int = 3,
    dropout: float = 0.5,
) -> VGG:
    """The paper's VGG-`depth` (11, 13, 16 or 19) for square `input_size` x `input_size` images.

    Flattened feature size d = 512 * (input_size / 2^5)^2 (five 2x2 max pools), so input_size must be a positive
    multiple of 32: 64 for Tiny ImageNet (d = 2048), 32 for CIFAR (d = 512).
    Source: danielkunin/neural-mechanics models/tinyimagenet_vgg.py (see the module docstring).
    """
    key = depth if isinstance(depth, str) else f"vgg{depth}"
    if key not in VGG_CFGS:
        raise ModelSpecError(f"no VGG of depth {depth!r}", f"use one of {sorted(VGG_CFGS)} (e.g. depth=16)")
    if input_size < 32 or input_size % 32 != 0:
        raise ModelSpecError(
            f"VGG input_size must be a positive multiple of 32 (five 2x2 max pools), got {input_size}",
            "use 64 for Tiny ImageNet or 32 for CIFAR, or resize your images",
        )
    cfg = VGG_CFGS[key]
    last_width = [c for c in cfg if c != "M"][-1]
    assert isinstance(last_width, int)
    pools = sum(1 for c in cfg if c == "M")
    spatial = input_size // 2**pools
    features = make_vgg_features(cfg, batch_norm=batch_norm, in_channels=in_channels)
    return VGG(
        features,
        num_classes=num_classes,
        feature_dim=last_width * spatial * spatial,
        dropout=dropout,
        input_shape=(in_channels, input_size, input_size),
    )


def vgg11(
    num_classes: int = 200, input_size: int = 64, batch_norm: bool = True, *, in_channels: int = 3, dropout: float = 0.5
) -> VGG:
    """VGG-11 (cfg "A"); see `vgg`."""
    return vgg(11, num_classes, input_size, batch_norm, in_channels=in_channels, dropout=dropout)


def vgg13(
    num_classes: int = 200, input_size: int = 64, batch_norm: bool = True, *, in_channels: int = 3, dropout: float = 0.5
) -> VGG:
    """VGG-13 (cfg "B"); see `vgg`."""
    return vgg(13, num_classes, input_size, batch_norm, in_channels=in_channels, dropout=dropout)


def vgg16(
    num_classes: int = 200, input_size: int = 64, batch_norm: bool = True, *, in_channels: int = 3, dropout: float = 0.5
) -> VGG:
    """The paper's VGG-16 (cfg "D"; 13 convs, 3 linears); Tiny ImageNet by default. See `vgg`."""
    return vgg(16, num_classes, input_size, batch_norm, in_channels=in_channels, dropout=dropout)


def vgg19(
    num_classes: int = 200, input_size: int = 64, batch_norm: bool = True, *, in_channels: int = 3, dropout: float = 0.5
) -> VGG:
    """VGG-19 (cfg "E"); see `vgg`."""
    return vgg(19, num_classes, input_size, batch_norm, in_channels=in_channels, dropout=dropout)


# -- small networks for the digits demo and tests ----------------------------------------------


class DigitsVGG(nn.Module):
    """A VGG-shaped network for 1x8x8 digits.

    features   = [conv(1->w)-BN-ReLU-conv(w->w)-BN-ReLU-maxpool] [conv(w->2w)-BN-ReLU-conv(2w->2w)-BN-ReLU-maxpool]
    classifier = Linear(2w*2*2, hidden)-ReLU-Linear(hidden, num_classes)
    (BN omitted when batch_norm=False). Convs keep their bias as in the paper's VGG, so with BN each conv bias is a
    translation- and scale-invariant parameter, exactly as in VGG-16-BN.
    """

    def __init__(
        self,
        num_classes: int = 10,
        batch_norm: bool = True,
        *,
        width: int = 16,
        hidden: int = 64,
        in_channels: int = 1,
        input_size: int = 8,
    ):
        super().__init__()
        if input_size < 4 or input_size % 4 != 0:
            raise ModelSpecError(f"DigitsVGG needs input_size divisible by 4, got {input_size}", "use 8 (digits)")
        self.input_shape = (in_channels, input_size, input_size)
        cfg: tuple[int | str, ...] = (width, width, "M", 2 * width, 2 * width, "M")
        self.features = make_vgg_features(cfg, batch_norm=batch_norm, in_channels=in_channels)
        flat = 2 * width * (input_size // 4) ** 2
        self.classifier = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(x)
        return self.classifier(out.flatten(1))


def digits_vgg(num_classes: int = 10, batch_norm: bool = True, **kwargs: int) -> DigitsVGG:
    """The digits demo network (see `DigitsVGG`)."""
    return DigitsVGG(num_classes=num_classes, batch_norm=batch_norm, **kwargs)


class MLP(nn.Module):
    """Flatten, then per hidden width h: Linear(prev, h) [+ BatchNorm1d(h)] + ReLU; then Linear(prev, num_classes).

    Accepts (N, F) or (N, C, H, W) inputs (the latter are flattened), with F = `in_features`. `bias=False` and
    `affine=False` (BatchNorm without weight and bias) leave only matrices to train, what torch.optim.Muon takes.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        hidden: Sequence[int] = (128, 128),
        batch_norm: bool = False,
        *,
        bias: bool = True,
        affine: bool = True,
    ):
        super().__init__()
        self.input_shape = (in_features,)
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers.append(nn.Linear(prev, h, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h, affine=affine))
            layers.append(nn.ReLU(inplace=True))
            prev = h
        layers.append(nn.Linear(prev, num_classes, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(
    num_classes: int = 10, in_features: int = 64, hidden: Sequence[int] = (128, 128), batch_norm: bool = False,
    *, bias: bool = True, affine: bool = True,
) -> MLP:
    """A ReLU MLP (see `MLP`); defaults fit the 64 pixels of a digits image."""
    return MLP(in_features=in_features, num_classes=num_classes, hidden=hidden, batch_norm=batch_norm, bias=bias,
               affine=affine)


# -- presets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """A named model: `factory(num_classes=...)` builds it; `input_shape` is one example's shape (no batch dim)."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    dataset: str
    description: str

    def build(self, num_classes: int | None = None) -> nn.Module:
        """A freshly initialised model (with the preset's class count unless `num_classes` is given)."""
        return self.factory(num_classes=self.num_classes if num_classes is None else num_classes)


def _vgg_presets() -> list[ModelPreset]:
    out = []
    datasets = (
        ("tinyimagenet", 64, 200, "Tiny ImageNet"),
        ("cifar10", 32, 10, "CIFAR-10"),
        ("cifar100", 32, 100, "CIFAR-100"),
    )
    for dataset, size, classes, label in datasets:
        for bn in (True, False):
            out.append(
                ModelPreset(
                    name=f"vgg16{'-bn' if bn else ''}-{dataset}",
                    factory=partial(vgg16, input_size=size, batch_norm=bn),
                    input_shape=(3, size, size),
                    num_classes=classes,
                    dataset=dataset,
                    description=f"the paper's VGG-16 {'with' if bn else 'without'} BatchNorm for {label} "
                    f"({size}x{size}, {classes} classes)",
                )
            )
    return out


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        *_vgg_presets(),
        ModelPreset(
            "digits-vgg-bn",
            partial(digits_vgg, batch_norm=True),
            (1, 8, 8),
            10,
            "digits",
            "small VGG-style CNN with BatchNorm for 8x8 scikit-learn digits (the demo network)",
        ),
        ModelPreset(
            "digits-vgg",
            partial(digits_vgg, batch_norm=False),
            (1, 8, 8),
            10,
            "digits",
            "the digits VGG without BatchNorm (rescale symmetries only)",
        ),
        ModelPreset(
            "mlp-bn",
            partial(mlp, batch_norm=True),
            (1, 8, 8),
            10,
            "digits",
            "ReLU MLP 64-128-128-10 with BatchNorm1d after each hidden Linear",
        ),
        ModelPreset(
            "mlp-bn-matrices",
            partial(mlp, batch_norm=True, bias=False, affine=False),
            (1, 8, 8),
            10,
            "digits",
            "the mlp-bn without biases and BatchNorm affine parameters: every trainable parameter a matrix "
            "(what torch.optim.Muon trains; each hidden row is a scale group)",
        ),
        ModelPreset(
            "mlp",
            partial(mlp, batch_norm=False),
            (1, 8, 8),
            10,
            "digits",
            "ReLU MLP 64-128-128-10 without BatchNorm",
        ),
        ModelPreset(
            "llama-tiny",
            tiny_llama,
            (32,),
            256,
            "tokens",
            "LLaMA-style language model: 2 blocks of RMSNorm, causal rotary attention (4 heads), SwiGLU; width 48, "
            "byte vocabulary (experiments/llama.py)",
        ),
    ]
}


def list_presets() -> tuple[ModelPreset, ...]:
    """All presets, in registry order."""
    return tuple(PRESETS.values())


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`; ModelSpecError with close matches if there is none."""
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(PRESETS), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ModelSpecError(
            f"unknown model preset {name!r}", f"{hint}presets: {', '.join(PRESETS)} (`nmech` lists them)"
        ) from None
