"""Hand-derived symmetry counts of the torchvision classifiers, read off the constructed module tree.

One function per architecture family (dispatched on the model's class) returns the expected
(translation, scale, rescale) group counts from the model's configuration: widths of the layers, which
activation follows which normaliser, where residual streams start, the classifier's input width. None of
them runs the model or the detector. The rules are those of docs/theory.md section 1 and the preamble of
docs/torchvision_counts.md, in short:

- translation: a Linear whose output goes straight into the softmax has one group per input column plus one
  for its bias; an attention key bias has one group per coordinate (q . (k + b) = q . k + q . b shifts every
  score of a query equally), when the engine can follow the attention;
- scale: parameters that write only into a train-mode normaliser. BatchNorm normalises per channel, so a
  conv/linear followed by BatchNorm gives one group per output channel; LayerNorm normalises over all
  features, so everything writing one LayerNorm's input is one group;
- rescale: a channel behind a positively homogeneous map (ReLU, pooling, identity, dropout, stochastic
  depth, the product with a squeeze-excitation gate) between writers (A1) and parameterised readers (A2);
  residual additions and concatenations tie the channels of all writers of one stream into one group per
  stream channel, and a stream that a LayerNorm also reads is tied across its channels into ONE group
  (LayerNorm absorbs only a joint scaling). ReLU6 (hardtanh), hardswish, SiLU, GELU, tanh and sigmoid
  are not homogeneous: nothing passes them. Attention adds, per embedding coordinate, a value group
  (value row, output-projection column) and a query/key pair.

Where the detector is known to be incomplete (sound, but it misses symmetries that exist) the derivation
follows the documented gap and `gap` names it: Swin V2 normalises q and k with F.normalize (its clamp_min is a
barrier). Two former gaps are closed: Swin V2's qkv bias computed in forward (now an added activation,
ops/linear.py `dense`) and MaxViT's einsum attention (rewritten as matmul, symmetry/einsum.py). A model whose
class has no
derivation here (a family torchvision adds later) is a regression snapshot: `derive` returns None and the
whole-list test compares its counts with the table the detector wrote. Today every family has a derivation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

Counts = tuple[int, int, int]
"""(translation, scale, rescale)."""

HOMOGENEOUS_ACTS = (nn.ReLU,)
"""Activation modules that are positively homogeneous (relu(a x) = a relu(x) for a > 0)."""


def _bn(module: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def _bn_channels(module: nn.Module) -> int:
    return sum(m.num_features for m in _bn(module))


def _head(linear: nn.Linear) -> int:
    """Softmax translation of a classifier: one group per input column, one for the bias."""
    return linear.in_features + (linear.bias is not None)


def _width(norm: nn.Module) -> int:
    """Features of a BatchNorm or LayerNorm."""
    return norm.num_features if isinstance(norm, nn.BatchNorm2d) else int(norm.normalized_shape[0])


def _cna_act(cna: nn.Sequential) -> nn.Module | None:
    """The activation of a torchvision Conv2dNormActivation (conv, norm[, activation]), or None."""
    return cna[2] if len(cna) > 2 else None


def _homogeneous(act: nn.Module | None) -> bool:
    return act is None or isinstance(act, (nn.Identity, *HOMOGENEOUS_ACTS))


def _streams(blocks: Iterable[tuple[bool, int, bool]]) -> int:
    """Rescale groups of residual streams: blocks as (opens a new stream, its width, its output is homogeneous).

    A block without a residual connection opens a stream; the following residual blocks write into it. A
    stream is one group per channel when every writer's output is homogeneous, none otherwise.
    """
    total, width, ok = 0, 0, False
    for opens, w, homogeneous in blocks:
        if opens:
            total += width if ok else 0
            width, ok = w, True
        ok = ok and homogeneous
    return total + (width if ok else 0)


# ---- plain stacks ----------------------------------------------------------------------------------------
def vgg_alexnet(model: nn.Module) -> Counts:
    """conv (-> BN) -> ReLU (-> max-pool) ... -> Linear -> ReLU -> Linear -> ReLU -> Linear(-> softmax).

    scale: every conv channel when BatchNorm follows; rescale: every conv channel (or its BN affine), read by
    the next conv or, through the pools and the flatten, by the first Linear's columns, and every hidden Linear
    neuron; translation: the last Linear.
    """
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    acts = [m for m in model.features if isinstance(m, nn.ReLU)]
    assert len(acts) == len(convs), "every conv (or its BatchNorm) is followed by a ReLU"
    channels = sum(c.out_channels for c in convs)
    scale = channels if _bn(model.features) else 0
    return _head(linears[-1]), scale, channels + sum(m.out_features for m in linears[:-1])


def squeezenet(model: nn.Module) -> Counts:
    """Convs with ReLU, fire modules concatenating two expand branches; the classifier is conv -> ReLU -> pool.

    The last conv writes the logits through a ReLU: no softmax shift reaches a parameter (translation 0) and its
    channels cannot be rescaled (the loss sees them); every other conv channel is read by a conv (rescale).
    """
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d)]
    assert isinstance(model.classifier[2], nn.ReLU)
    return 0, 0, sum(c.out_channels for c in convs)


# ---- residual convnets -----------------------------------------------------------------------------------
def resnet(model: nn.Module) -> Counts:
    """ResNet, Wide ResNet, ResNeXt: every conv is followed by a train-mode BatchNorm (scale per channel).

    rescale: the inner BNs followed by ReLU (BasicBlock: bn1; Bottleneck: bn1, bn2), read by the next conv
    (a block of a grouped conv); and one group per channel of each residual stream: the stem, then a new stream
    wherever a block has a downsample (its out BN and the downsample BN write it, later blocks add to it).
    The last stream reaches the classifier through ReLU and average pooling.
    """
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    inner = 0
    for b in blocks:
        inner += b.bn1.num_features
        if isinstance(b, torchvision.models.resnet.Bottleneck):
            inner += b.bn2.num_features
    out = [(b.bn3 if isinstance(b, torchvision.models.resnet.Bottleneck) else b.bn2).num_features for b in blocks]
    streams = model.bn1.num_features + sum(w for b, w in zip(blocks, out, strict=True) if b.downsample is not None)
    return _head(model.fc), _bn_channels(model), inner + streams


def densenet(model: nn.Module) -> Counts:
    """Dense blocks: BN -> ReLU -> conv(1x1) -> BN -> ReLU -> conv(3x3), outputs concatenated.

    Every conv output (the dense layers' new channels, the 1x1 bottlenecks, the transitions, conv0) is read only by
    BatchNorms: one scale group per channel. norm0's affine output reaches, through ReLU and max-pool, only the
    first block's concatenation, read by BatchNorms only: scale too. Every other BN is followed by ReLU and read
    by a conv or the classifier: rescale.
    """
    f = model.features
    convs = [m for m in f.modules() if isinstance(m, nn.Conv2d)]
    stem = f.norm0.num_features
    return _head(model.classifier), sum(c.out_channels for c in convs) + stem, _bn_channels(f) - stem


def regnet(model: nn.Module) -> Counts:
    """RegNet X/Y: a (1x1, BN, ReLU) -> b (3x3 grouped, BN, ReLU) -> [SE] -> c (1x1, BN); out = ReLU(proj(x) + f(x)).

    scale: every BN channel (each follows a conv). rescale: a and b's BN channels (b's also read by SE's fc1,
    which absorbs the scale of the gate's input); SE's squeeze channels (fc1 -> ReLU -> fc2); one group per
    channel of each stream: the stem's, and a new one at every block with a projection shortcut.
    """
    blocks = [b for stage in model.trunk_output for b in stage]
    assert isinstance(_cna_act(model.stem), nn.ReLU)
    inner = 0
    for b in blocks:
        assert isinstance(b.activation, nn.ReLU) and isinstance(_cna_act(b.f.a), nn.ReLU)
        inner += b.f.a[1].num_features + b.f.b[1].num_features
        if hasattr(b.f, "se"):
            assert isinstance(b.f.se.activation, nn.ReLU)
            inner += b.f.se.fc1.out_channels
    streams = model.stem[1].num_features + sum(b.f.c[1].num_features for b in blocks if b.proj is not None)
    return _head(model.fc), _bn_channels(model), inner + streams


def shufflenet(model: nn.Module) -> Counts:
    """ShuffleNet V2: every BN (after a conv) is followed by ReLU or by a 1x1 conv, and every channel reaches a conv
    or the classifier through splits, concatenations and channel shuffles, which move channels without adding
    them: each BN channel is one scale group (its conv) and one rescale group (its affine)."""
    bn = _bn_channels(model)
    return _head(model.fc), bn, bn


# ---- inverted residuals ----------------------------------------------------------------------------------
def mobilenet_v2(model: nn.Module) -> Counts:
    """Inverted residuals with ReLU6 (= hardtanh: not homogeneous) after every BN but the linear bottleneck.

    rescale: one group per channel of each bottleneck stream (a block without residual connection opens one,
    residual blocks add to it; read by the next expansion conv).
    """
    blocks = [m for m in model.features if isinstance(m, torchvision.models.mobilenetv2.InvertedResidual)]
    assert all(isinstance(_cna_act(c), nn.ReLU6) for b in blocks for c in b.conv if isinstance(c, Conv2dNormActivation))
    streams = _streams((not b.use_res_connect, b.out_channels, True) for b in blocks)
    return _head(model.classifier[-1]), _bn_channels(model), streams


def mobilenet_v3(model: nn.Module) -> Counts:
    """Inverted residuals with ReLU or hardswish, squeeze-excitation with a hardsigmoid gate.

    rescale: the BNs followed by ReLU (read by the depthwise conv; after the depthwise conv by SE's fc1, which
    absorbs the gate input's scale, and the projection), SE's squeeze channels (fc1 -> ReLU -> fc2), the
    bottleneck streams. hardswish blocks the stem, the last conv and the classifier's hidden Linear.
    """
    blocks = [m for m in model.features if isinstance(m, torchvision.models.mobilenetv3.InvertedResidual)]
    inner = 0
    for b in blocks:
        for layer in b.block[:-1]:
            if isinstance(layer, Conv2dNormActivation) and isinstance(_cna_act(layer), nn.ReLU):
                inner += layer[1].num_features
            elif isinstance(layer, SqueezeExcitation):
                assert isinstance(layer.activation, nn.ReLU)
                inner += layer.fc1.out_channels
    streams = _streams((not b.use_res_connect, b.out_channels, True) for b in blocks)
    assert isinstance(model.classifier[1], nn.Hardswish)
    return _head(model.classifier[-1]), _bn_channels(model), inner + streams


def efficientnet(model: nn.Module) -> Counts:
    """EfficientNet (MBConv) and V2 (FusedMBConv + MBConv): SiLU after every BN except the projections.

    SiLU also follows SE's fc1 and the sigmoid its fc2: no inner rescale groups. Bottleneck streams are
    rescalable when every block writing them ends in a projection without activation; V2's first stage
    (FusedMBConv with expansion 1: conv -> BN -> SiLU) writes its stream through SiLU, which taints it.
    """
    blocks = [b for stage in model.features[1:-1] for b in stage]
    streams = _streams((not b.use_res_connect, b.out_channels, _homogeneous(_cna_act(b.block[-1]))) for b in blocks)
    return _head(model.classifier[-1]), _bn_channels(model), streams


def mnasnet(model: nn.Module) -> Counts:
    """MNASNet: conv -> BN -> ReLU stem, a depthwise-separable conv into the first bottleneck, stacks of inverted
    residuals (expand BN ReLU, depthwise BN ReLU, project BN), a 1x1 conv BN ReLU head.

    rescale: every BN followed by ReLU, and one group per channel of each bottleneck stream (the separable conv's
    BN opens the first; a block without residual connection opens the next).
    """
    def relu_bns(seq: nn.Sequential) -> int:
        return sum(m.num_features for m, nxt in zip(seq, list(seq)[1:], strict=False)
                   if isinstance(m, nn.BatchNorm2d) and isinstance(nxt, nn.ReLU))

    layers = model.layers
    stacks = [m for m in layers if isinstance(m, nn.Sequential)]
    blocks = [b for s in stacks for b in s]
    first = next(m for i, m in enumerate(layers) if isinstance(m, nn.BatchNorm2d)
                 and not isinstance(layers[i + 1], nn.ReLU))
    inner = relu_bns(layers) + sum(relu_bns(b.layers) for b in blocks)
    streams = _streams([(True, first.num_features, True)] + [(not b.apply_residual, b.layers[-1].num_features, True)
                                                             for b in blocks])
    return _head(model.classifier[-1]), _bn_channels(model), inner + streams


# ---- inception -------------------------------------------------------------------------------------------
def googlenet(model: nn.Module, aux_in_loss: bool) -> Counts:
    """Every conv is a BasicConv2d (conv -> BN -> ReLU) whose output is read by convs of the next inception
    module (branches concatenated; a max-pool branch passes channels on), an auxiliary head or the classifier:
    every BN channel is one scale and one rescale group. Auxiliary heads (when their logits reach the loss):
    fc1 -> ReLU -> fc2 adds fc1's neurons (rescale) and fc2's translation."""
    heads = [a for a in (model.aux1, model.aux2) if a is not None]
    aux = heads if aux_in_loss else []
    bn = _bn_channels(model) - (0 if aux_in_loss else sum(_bn_channels(a) for a in heads))
    return (_head(model.fc) + sum(_head(a.fc2) for a in aux), bn, bn + sum(a.fc1.out_features for a in aux))


def inception_v3(model: nn.Module, aux_in_loss: bool) -> Counts:
    """BasicConv2d everywhere (conv -> BN -> ReLU, read by convs, pools or the classifier): every BN channel is one
    scale and one rescale group; the auxiliary head (conv, conv, Linear) adds its Linear's translation."""
    aux = model.AuxLogits if aux_in_loss else None
    bn = _bn_channels(model) - (_bn_channels(model.AuxLogits) if model.AuxLogits is not None and aux is None else 0)
    return _head(model.fc) + (_head(aux.fc) if aux is not None else 0), bn, bn


# ---- LayerNorm models ------------------------------------------------------------------------------------
def convnext(model: nn.Module) -> Counts:
    """Stem conv -> LayerNorm2d; CNBlock: dwconv -> LayerNorm -> Linear -> GELU -> Linear -> layer_scale, + x;
    downsample LayerNorm2d -> conv; classifier LayerNorm2d -> Linear.

    scale: the stem conv and every block's dwconv, each normalised jointly by a LayerNorm (one group each).
    rescale per block: the LayerNorm's affine (read by the first Linear's columns) and the second Linear's
    features (read by layer_scale); every downsample's and the classifier's LayerNorm affine (read by a conv /
    Linear); one joint group per stage stream (written by the stem LayerNorm or the downsample conv and every
    layer_scale, read by the dwconvs, normalised jointly by the next LayerNorm2d).
    """
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.convnext.CNBlock)]
    downsamples = [m for m in model.features[1:] if not isinstance(m[0], torchvision.models.convnext.CNBlock)]
    stages = len(model.features) - 1 - len(downsamples)
    rescale = (sum(2 * _width(b.block[2]) for b in blocks) + sum(_width(d[0]) for d in downsamples)
               + _width(model.classifier[0]) + stages)
    return _head(model.classifier[-1]), 1 + len(blocks), rescale


def vit(model: nn.Module) -> Counts:
    """Pre-LN encoder: x += attn(ln_1(x)); x += mlp(ln_2(x)); final ln -> class token -> head.

    translation: the head, and every layer's key bias (hidden coordinates each). scale: the residual stream, read
    only by LayerNorms: one group. rescale per layer and coordinate: ln_1's affine (read by in_proj's columns),
    ln_2's affine (read by the MLP's first Linear), the value (in_proj's value row, out_proj's column) and the
    query/key pair; plus the final ln's affine read by the head. GELU blocks the MLP's hidden layer.
    """
    layers = list(model.encoder.layers)
    d = model.hidden_dim
    assert all(layer.self_attention.in_proj_bias is not None for layer in layers)
    return _head(model.heads.head) + len(layers) * d, 1, 4 * len(layers) * d + _width(model.encoder.ln)


def swin(model: nn.Module) -> Counts:
    """Swin V1 (pre-LN: x += attn(norm1(x)); x += mlp(norm2(x))) and V2 (post-LN: x += norm1(attn(x)); ...).

    V1: translation = head + every block's key bias (C each); scale = the stem conv (LayerNorm after it) + one
    group per stage stream (read only by LayerNorms); rescale per block = 4 C (norm1 affine -> qkv columns, norm2
    affine -> mlp columns, values -> proj columns, query/key pairs) + PatchMerging's norm affine (4 C, read by
    the reduction) + the final norm affine (read by the head).
    V2: cosine attention zeroes the key bias and normalises q, k (no translation, no pair); attn.proj writes
    into norm1 and mlp.3 into norm2 (2 scale groups per block), PatchMerging V2 is reduction -> norm (1 each),
    plus the stem; rescale: the continuous position bias MLP's hidden neurons (Linear -> ReLU -> Linear), the
    final norm's affine, per block the values (qkv's value row c, + its computed bias, -> proj's column c: C),
    and the stage streams (x += norm1(attn(x)); x += norm2(mlp(x)): written by the stem's or the merge's norm
    affine and every block's norm affines, read by qkv's and mlp.0's columns): one group per channel in a stage
    that a PatchMerging reduction reads (C of the stage = reduction.in_features / 4), and ONE group for the last
    stage, which the final norm normalises jointly. Gap: F.normalize's clamp_min(eps) is no normaliser for the
    engine, so the per-head scale groups of the cosine-normalised queries and keys are not found (see `gap`).
    """
    blocks = [m for m in model.modules() if isinstance(m, torchvision.models.swin_transformer.SwinTransformerBlock)]
    merges = [m for m in model.features if isinstance(m, torchvision.models.swin_transformer.PatchMerging)]
    merges_v2 = [m for m in model.features if isinstance(m, torchvision.models.swin_transformer.PatchMergingV2)]
    final = _width(model.norm)
    if merges_v2 or any(isinstance(b, torchvision.models.swin_transformer.SwinTransformerBlockV2) for b in blocks):
        cpb = sum(b.attn.cpb_mlp[0].out_features for b in blocks)
        assert all(isinstance(b.attn.cpb_mlp[1], nn.ReLU) for b in blocks)
        values = sum(b.attn.proj.in_features for b in blocks)
        streams = sum(m.reduction.in_features // 4 for m in merges_v2) + 1
        return _head(model.head), 1 + 2 * len(blocks) + len(merges_v2), cpb + final + values + streams
    c = sum(_width(b.norm1) for b in blocks)
    stages = len(merges) + 1
    return _head(model.head) + c, 1 + stages, 4 * c + sum(_width(m.norm) for m in merges) + final


def maxvit(model: nn.Module) -> Counts:
    """Stem (conv BN GELU, conv); per layer MBConv (pre_norm BN -> conv_a BN GELU -> dwconv BN GELU -> SE (SiLU,
    sigmoid) -> conv_c, + shortcut: identity, or avg-pool -> proj conv in a block's first layer), then window and
    grid attention (x += attn(LN(x)); x += mlp(LN(x))); classifier pool -> LN -> Linear -> tanh -> Linear (no bias).

    translation: the last Linear's columns; per attention of width D (einsum q k^T plus a relative position bias
    constant per (head, i, j), then softmax over the keys): the key bias per coordinate (k is multiplied by a
    constant scale factor first, which keeps the shift constant over the keys): D. scale: the stem conv and
    conv_a / conv_b per channel (BN); the last block's stream (read only by BatchNorms and LayerNorms): one joint
    group. rescale: the stem's second conv (read by the first proj conv, normalised per channel by pre_norm) per
    channel; pre_norm's affine (read by conv_a); each attention's and MLP's LayerNorm affine (read by to_qkv /
    the first MLP Linear); per attention of width D, the values (to_qkv's value row c -> merge's column c) and the
    query/key pairs (to_qkv's query row c with key row c): 2 D; one joint group per earlier block stream (read by
    the next block's proj conv, tied by the LayerNorms); the classifier LayerNorm's affine.
    """
    layers = [layer for block in model.blocks for layer in block.layers]
    scale = model.stem[0][1].num_features
    rescale = model.stem[1][0].out_channels + _width(model.classifier[2]) + len(model.blocks) - 1
    translation = _head(model.classifier[-1])
    for layer in layers:
        mb = layer.layers.MBconv.layers
        scale += mb.conv_a[1].num_features + mb.conv_b[1].num_features
        rescale += _width(mb.pre_norm)
        for part in (layer.layers.window_attention, layer.layers.grid_attention):
            width = part.attn_layer[1].merge.in_features
            rescale += _width(part.attn_layer[0]) + _width(part.mlp_layer[0]) + 2 * width
            translation += width
    return translation, scale + 1, rescale


# ---- dispatch --------------------------------------------------------------------------------------------
FAMILIES: dict[str, Callable[[nn.Module], Counts]] = {
    "VGG": vgg_alexnet, "AlexNet": vgg_alexnet, "SqueezeNet": squeezenet, "ResNet": resnet, "DenseNet": densenet,
    "RegNet": regnet, "ShuffleNetV2": shufflenet, "MobileNetV2": mobilenet_v2, "MobileNetV3": mobilenet_v3,
    "EfficientNet": efficientnet, "MNASNet": mnasnet, "ConvNeXt": convnext, "VisionTransformer": vit,
    "SwinTransformer": swin, "MaxVit": maxvit,
}
"""Model class name -> derivation (GoogLeNet and Inception3 in AUX_FAMILIES: they need to know whether their
auxiliary heads reach the loss)."""

AUX_FAMILIES: dict[str, Callable[[nn.Module, bool], Counts]] = {"GoogLeNet": googlenet, "Inception3": inception_v3}

def gap(model: nn.Module) -> str | None:
    """The documented detector gap a model's derivation follows (symmetries that exist but are not found), or None."""
    name = type(model).__name__
    if name == "SwinTransformer" and any(isinstance(m, torchvision.models.swin_transformer.SwinTransformerBlockV2)
                                         for m in model.modules()):
        return ("cosine attention normalises q and k with F.normalize, whose clamp_min(eps) is a barrier: the "
                "per-head query and key scale groups that exist are not found")
    return None


def derive(model: nn.Module, aux_in_loss: bool = False) -> Counts | None:
    """Expected (translation, scale, rescale) of a torchvision classifier in train mode, or None (no derivation).

    aux_in_loss: GoogLeNet / Inception v3 only: whether the auxiliary heads' logits reach the loss.
    """
    name = type(model).__name__
    if name in AUX_FAMILIES:
        return AUX_FAMILIES[name](model, aux_in_loss)
    fn = FAMILIES.get(name)
    return None if fn is None else fn(model)


def provenance(model: nn.Module) -> str:
    """The `expected counts` column of docs/torchvision_counts.md: "derived", "derived (gap)" or "snapshot"."""
    if type(model).__name__ not in FAMILIES and type(model).__name__ not in AUX_FAMILIES:
        return "snapshot"
    return "derived (gap)" if gap(model) else "derived"


def skeleton(name: str, **kwargs) -> nn.Module:
    """The model's module tree without weights (meta device), for a derivation; RegNet's builder computes widths
    with tensors and is built on the CPU."""
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, num_classes=10, **kwargs)
    except (NotImplementedError, RuntimeError):
        return torchvision.models.get_model(name, num_classes=10, **kwargs)
