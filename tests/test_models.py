"""The paper's VGG variants, the digits networks and the preset registry.

References: torchvision's VGG feature stacks (same conv/BN/ReLU/pool layout), parameter counts derived by hand
from the cfg table, and the reference code's classifier/initialisation facts.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neural_mechanics.errors import ModelSpecError
from neural_mechanics.experiments.models import (
    PRESETS,
    VGG_CFGS,
    DigitsVGG,
    ModelPreset,
    get_preset,
    list_presets,
    mlp,
    vgg,
    vgg11,
    vgg13,
    vgg16,
    vgg19,
)

torch.set_num_threads(1)


def hand_count_vgg(cfg, batch_norm: bool, input_size: int, num_classes: int, in_channels: int = 3) -> int:
    """Parameters of the reference VGG, counted from the cfg: convs 9*cin*cout + cout, BN 2c, 3 linears."""
    total, c = 0, in_channels
    for item in cfg:
        if item == "M":
            continue
        total += 9 * c * item + item + (2 * item if batch_norm else 0)
        c = item
    d = c * (input_size // 32) ** 2
    h = d // 2
    return total + (d * h + h) + (h * h + h) + (h * num_classes + num_classes)


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize(("input_size", "num_classes"), [(64, 200), (32, 10), (32, 100)])
def test_vgg16_parameter_count_and_output(batch_norm, input_size, num_classes):
    model = vgg16(num_classes=num_classes, input_size=input_size, batch_norm=batch_norm)
    n = sum(p.numel() for p in model.parameters())
    assert n == hand_count_vgg(VGG_CFGS["vgg16"], batch_norm, input_size, num_classes)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, input_size, input_size))
    assert out.shape == (2, num_classes)
    assert model.input_shape == (3, input_size, input_size)


def test_vgg16_tinyimagenet_known_sizes():
    # Reference code: dim = 512 * 4 for Tiny ImageNet (64x64), 512 * 1 for CIFAR (32x32).
    ti = vgg16(num_classes=200, input_size=64, batch_norm=True)
    linears = [m for m in ti.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 1024), (1024, 1024), (1024, 200)]
    cifar = vgg16(num_classes=10, input_size=32, batch_norm=True)
    linears = [m for m in cifar.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 256), (256, 10)]
    dropouts = [m for m in ti.classifier if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 and all(m.p == 0.5 for m in dropouts)
    assert sum(isinstance(m, nn.MaxPool2d) for m in ti.features) == 5
    convs = [m for m in ti.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(m.bias is not None and m.kernel_size == (3, 3) for m in convs)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_vgg16_features_match_torchvision_layout(batch_norm):
    from torchvision.models import vgg as tv_vgg

    ref = tv_vgg.make_layers(tv_vgg.cfgs["D"], batch_norm=batch_norm)  # torchvision's vgg16(_bn).features
    ours = vgg16(batch_norm=batch_norm).features
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert [type(m) for m in ours] == [type(m) for m in ref]


@pytest.mark.parametrize(("fn", "convs"), [(vgg11, 8), (vgg13, 10), (vgg16, 13), (vgg19, 16)])
def test_vgg_depths(fn, convs):
    model = fn(num_classes=10, input_size=32, batch_norm=True)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == convs
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == convs
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3


def test_vgg16_without_bn_has_no_norm_layers():
    model = vgg16(batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_vgg_initialisation_matches_reference():
    torch.manual_seed(0)
    model = vgg16(num_classes=200, input_size=64, batch_norm=True)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert torch.all(m.bias == 0)
            fan_out = m.out_channels * 9
            # kaiming normal, fan_out, relu gain: std = sqrt(2 / fan_out)
            assert m.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        elif isinstance(m, nn.Linear):
            assert torch.all(m.bias == 0)
            assert m.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_vgg_dropout_is_active_only_in_train_mode():
    torch.manual_seed(0)
    model = vgg16(num_classes=10, input_size=32, batch_norm=False)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("bad", [48, 16, 0])
def test_vgg_rejects_input_size_not_multiple_of_32(bad):
    with pytest.raises(ModelSpecError, match="multiple of 32"):
        vgg16(input_size=bad)


def test_vgg_rejects_unknown_depth():
    with pytest.raises(ModelSpecError, match="depth"):
        vgg(17)


def test_vgg_in_channels():
    model = vgg16(num_classes=10, input_size=32, in_channels=1)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


# -- digits and MLP ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [True, False])
def test_digits_vgg_structure(batch_norm):
    model = DigitsVGG(batch_norm=batch_norm)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(1, 16), (16, 16), (16, 32), (32, 32)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (4 if batch_norm else 0)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 2
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(128, 64), (64, 10)]
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_mlp_accepts_flat_and_image_inputs(batch_norm):
    torch.manual_seed(0)
    model = mlp(batch_norm=batch_norm).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model(x.flatten(1)))
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == (2 if batch_norm else 0)
    assert model.input_shape == (64,)


def test_digits_vgg_learns_digits_in_a_few_hundred_steps():
    from neural_mechanics.experiments.datasets import load_dataset, make_loader

    torch.manual_seed(0)
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    model = get_preset("digits-vgg-bn").build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    step = 0
    loader = make_loader(train, 64, seed=0)
    while step < 200:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 200:
                break
    model.eval()
    xs = torch.stack([test.dataset[i][0] for i in range(len(test))])
    ys = torch.tensor([test.dataset[i][1] for i in range(len(test))])
    with torch.no_grad():
        accuracy = (model(xs).argmax(1) == ys).float().mean().item()
    assert accuracy > 0.9


# -- presets -----------------------------------------------------------------------------------

EXPECTED_PRESETS = {
    "vgg16-bn-tinyimagenet",
    "vgg16-tinyimagenet",
    "vgg16-bn-cifar10",
    "vgg16-cifar10",
    "vgg16-bn-cifar100",
    "vgg16-cifar100",
    "digits-vgg-bn",
    "digits-vgg",
    "mlp-bn",
    "mlp-bn-matrices",  # Muon: every trainable parameter a matrix (issue 14)
    "mlp",
    "llama-tiny",
}


def test_list_presets_has_the_documented_names():
    presets = list_presets()
    assert {p.name for p in presets} == EXPECTED_PRESETS
    assert all(isinstance(p, ModelPreset) and p.description for p in presets)
    assert list(PRESETS) == [p.name for p in presets]


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_every_preset_builds_and_runs_at_its_input_shape(name):
    preset = get_preset(name)
    model = preset.build().eval()
    tokens = preset.dataset == "tokens"  # a language model: token ids in, logits over the vocabulary per position
    shape = (2, *preset.input_shape)
    x = torch.randint(0, preset.num_classes, shape) if tokens else torch.randn(shape)
    with torch.no_grad():
        out = model(x)
    assert out.shape == ((2, *preset.input_shape, preset.num_classes) if tokens else (2, preset.num_classes))
    has_bn = any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
    assert has_bn == ("-bn" in name)


def test_preset_build_with_other_num_classes():
    model = get_preset("digits-vgg").build(num_classes=3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_preset_is_frozen():
    preset = get_preset("mlp")
    with pytest.raises(AttributeError):
        preset.name = "x"  # type: ignore[misc]


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ModelSpecError, match="vgg16-bn-cifar10"):
        get_preset("vgg16-bn-cifar")
