"""find_symmetries on the paper's VGG-16 (Tiny ImageNet preset) and torchvision resnet18 / vgg16_bn.

Counts are derived by hand in the comments; groups are certified on a random sample per kind plus
the composition of every group of each kind (float64, eps ~ 0).
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from neural_mechanics.experiments.models import vgg16
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.symmetry.groups import Member
from test_detect_support import certify_all_at_once, certify_groups

torch.set_num_threads(1)

# 13 convs of VGG-16: widths 64,64 | 128,128 | 256,256,256 | 512,512,512 | 512,512,512
VGG16_CHANNELS = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512  # = 4224


def _check(model, x, expected, sample=6):
    s = find_symmetries(model, x)
    c = s.counts()
    assert (c["translation"], c["scale"], c["rescale"]) == expected, s.details()
    by_kind = {k: list(s.filter(k)) for k in ("translation", "scale", "rescale")}
    for groups in by_kind.values():
        certify_groups(model, groups, x, sample=sample)
    return s


@pytest.mark.slow
def test_paper_vgg16_batchnorm_tiny_imagenet():
    torch.manual_seed(0)
    m = vgg16(num_classes=200, input_size=64, batch_norm=True)
    x = torch.randn(2, 3, 64, 64)
    # scale: one group per conv channel (conv rows + bias, normalised by train BN): 4224.
    # rescale: BN affine per channel (4224; the last block is read by Linear(2048, 1024) through 2x2 = 4
    #          columns per channel) + the two hidden Linear layers (1024 + 1024) = 6272.
    # translation: Linear(1024, 200): 1024 columns + bias = 1025.
    s = _check(m, x, (1025, VGG16_CHANNELS, VGG16_CHANNELS + 2048))
    last_bn = next(g for g in s.filter("rescale") if g.layer == "features.41")
    reader = last_bn.members[-1]
    assert reader.param == "classifier.0.weight" and reader.dim == 1 and len(reader.index) == 4
    certify_all_at_once(m, s, x, "scale")


@pytest.mark.slow
def test_paper_vgg16_without_batchnorm():
    torch.manual_seed(1)
    m = vgg16(num_classes=200, input_size=64, batch_norm=False)
    x = torch.randn(2, 3, 64, 64)
    # no scale; rescale: every conv channel (4224) + 1024 + 1024; translation 1025.
    s = _check(m, x, (1025, 0, VGG16_CHANNELS + 2048))
    assert set(s["rescale:features.0[5]"].members) == {
        Member("features.0.weight", 0, (5,), "in"), Member("features.0.bias", 0, (5,), "in"),
        Member("features.2.weight", 1, (5,), "out")}
    certify_all_at_once(m, s, x, "rescale")


@pytest.mark.slow
def test_torchvision_resnet18():
    torch.manual_seed(2)
    m = torchvision.models.resnet18()
    x = torch.randn(2, 3, 32, 32)
    # scale: 20 convs (17 + 3 downsample), all followed by train BN:
    #   64 + 4*64 + (4*128 + 128) + (4*256 + 256) + (4*512 + 512) = 4800.
    # rescale: the bn1 of each of the 8 blocks (read by the block's conv2): 2*(64+128+256+512) = 1920;
    #   plus one class per stream channel and stage, tying every bn2 (and downsample BN / stem bn1) that
    #   writes the stream through the residual adds: 64 + 128 + 256 + 512 = 960. Total 2880.
    # translation: fc 512 columns + bias = 513.
    s = _check(m, x, (513, 4800, 2880))
    g = s["rescale:layer2.0.bn2[7]"]
    writers = {mm.param for mm in g.members if mm.role == "in"}
    readers = {mm.param for mm in g.members if mm.role == "out"}
    assert writers == {"layer2.0.bn2.weight", "layer2.0.bn2.bias", "layer2.0.downsample.1.weight",
                       "layer2.0.downsample.1.bias", "layer2.1.bn2.weight", "layer2.1.bn2.bias"}
    assert readers == {"layer2.1.conv1.weight", "layer3.0.conv1.weight", "layer3.0.downsample.0.weight"}
    assert sum("aten.add" in step for step in g.chain) >= 1
    stem = s["rescale:bn1[3]"]
    assert {mm.param for mm in stem.members if mm.role == "in"} == {
        "bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "layer1.0.bn2.bias", "layer1.1.bn2.weight",
        "layer1.1.bn2.bias"}
    certify_all_at_once(m, s, x, "rescale")


@pytest.mark.slow
def test_torchvision_vgg16_bn():
    torch.manual_seed(3)
    m = torchvision.models.vgg16_bn(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    # scale: 4224 conv channels; rescale: 4224 BN channels (the last read through AdaptiveAvgPool(7) +
    # flatten: 49 columns each) + 4096 + 4096; translation: 4096 + 1.
    s = _check(m, x, (4097, 4224, 4224 + 8192), sample=2)  # float64 copy of 138M parameters: keep it short
    reader = s["rescale:features.41[0]"].members[-1]
    assert reader == Member("classifier.0.weight", 1, tuple(range(49)), "out")


def test_resnet18_groups_pass_the_certify_module():
    """The other prediction: symmetry/certify.py (compositions per kind + a sample of single groups)."""
    from neural_mechanics.symmetry.certify import certify

    torch.manual_seed(4)
    m = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    s = find_symmetries(m, x)
    report = certify(m, s, x, sample=8)
    assert report.ok, report
