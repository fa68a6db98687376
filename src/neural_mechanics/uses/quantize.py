"""Per-tensor symmetric weight quantisation (simulated) and its error: what `equalize` is for.

int8 per-tensor symmetric quantisation of a weight tensor W, as in post-training quantisation:

    step = max|W| / (2^(bits-1) - 1),    Q(W) = clamp(round(W / step), -(2^(bits-1) - 1), 2^(bits-1) - 1) * step

so every entry is off by at most step / 2, and channels whose weights are much smaller than the tensor's
largest entry lose most of their precision. That is the error cross-layer equalisation reduces.

`quantization_error` reports, for the tensors chosen by `quantized(name, tensor)` (default: ndim >= 2, the
weights; biases and normalisation affines stay in float as in int8 inference):

* the relative weight error |Q(W) - W| / |W| per tensor and its mean;
* with example inputs, the effect on the function: the relative output error |f_Q(x) - f(x)| / |f(x)|
  (Frobenius norms over the batch) and the fraction of samples whose arg-max is unchanged.

`fold_batchnorm` folds eval-mode BatchNorm into the preceding convolution (torch.fx's `fuse`), the step
DFQ takes before equalising: afterwards the per-channel BatchNorm scale lives in the conv weights, where
it spreads the channel ranges, and the folded conv -> ReLU -> conv pairs are rescale groups.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.fx.experimental.optimization import fuse

from neural_mechanics.uses.equalize import default_quantized
from neural_mechanics.uses.orbits import SymmetryUseError

__all__ = ["QuantizationError", "fold_batchnorm", "quantization_error", "quantize_tensor", "quantize_weights"]


def quantize_tensor(w: Tensor, bits: int = 8) -> Tensor:
    """Q(W): symmetric per-tensor fake quantisation to `bits` bits (module docstring); zeros stay zeros."""
    if bits < 2:
        raise SymmetryUseError(f"bits must be >= 2, got {bits}", "use bits=8 for int8")
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().max()
    if amax == 0:
        return w.detach().clone()
    step = amax / qmax
    return torch.clamp(torch.round(w.detach() / step), -qmax, qmax) * step


def quantize_weights(model: nn.Module, bits: int = 8, *, quantized: Callable[[str, Tensor], bool] = default_quantized,
                     inplace: bool = False) -> nn.Module:
    """A copy of `model` (or the model) whose selected weight tensors are replaced by Q(W)."""
    out = model if inplace else copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if quantized(name, p):
                p.copy_(quantize_tensor(p, bits))
    return out


@dataclass
class QuantizationError:
    """Weight and (with inputs) output error of per-tensor quantisation; see the module docstring."""

    bits: int
    weights: dict[str, float]
    """Per quantised tensor, |Q(W) - W| / |W|."""
    output_error: float | None = None
    """|f_Q(x) - f(x)| / |f(x)| over the batch (None without inputs)."""
    agreement: float | None = None
    """Fraction of samples whose arg-max over dim 1 is unchanged (None without inputs)."""

    @property
    def mean_weight_error(self) -> float:
        return sum(self.weights.values()) / max(len(self.weights), 1)


def _forward(model: nn.Module, params: dict[str, Tensor], inputs: Any) -> Tensor:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        out = functional_call(model, params, args)
    if not isinstance(out, Tensor):
        raise SymmetryUseError(f"the model returns {type(out).__name__}, not a tensor",
                               "measure the output error on a model that returns logits, or pass inputs=None")
    return out.detach().to(torch.float64)


def quantization_error(model: nn.Module, inputs: Any = None, bits: int = 8, *,
                       quantized: Callable[[str, Tensor], bool] = default_quantized) -> QuantizationError:
    """How much per-tensor `bits`-bit quantisation of the selected weights changes them and (with inputs) the
    outputs. The model is evaluated in its current mode (call .eval() first for inference numbers) and is not
    modified."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    q = {n: quantize_tensor(p, bits) if quantized(n, p) else p for n, p in params.items()}
    weights = {}
    for n, p in params.items():
        if quantized(n, p):
            norm = float(p.to(torch.float64).norm())
            weights[n] = float((q[n].to(torch.float64) - p.to(torch.float64)).norm()) / norm if norm else 0.0
    if not weights:
        raise SymmetryUseError("no parameter is selected for quantisation",
                               "pass quantized=callable(name, tensor) -> bool that selects the weights")
    result = QuantizationError(bits, weights)
    if inputs is not None:
        work = copy.deepcopy(model)  # a train-mode BatchNorm would update the model's running statistics
        f = _forward(work, params, inputs)
        fq = _forward(work, q, inputs)
        result.output_error = float((fq - f).norm() / f.norm().clamp_min(torch.finfo(torch.float64).tiny))
        if f.ndim >= 2:
            result.agreement = float((fq.argmax(1) == f.argmax(1)).to(torch.float64).mean())
    return result


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of the eval-mode `model` with every BatchNorm that follows a convolution folded into it.

    Uses torch.fx symbolic tracing (`torch.fx.experimental.optimization.fuse`); parameter names of the
    convolutions are kept, each gains a bias. torch creates the bias of a conv that had none with
    requires_grad=False, which would make it a frozen parameter (left out of every group, so it would block
    the rescale symmetries through that conv); it is made trainable like its weight. SymmetryUseError if the
    model is in train mode (batch statistics cannot be folded) or cannot be traced.
    """
    if model.training:
        raise SymmetryUseError("fold_batchnorm needs an eval-mode model (train-mode BatchNorm uses batch statistics)",
                               "call model.eval() first")
    try:
        fused = fuse(model, inplace=False)
    except Exception as exc:  # torch.fx raises many types on untraceable control flow
        raise SymmetryUseError(f"torch.fx could not trace {type(model).__name__} to fold its BatchNorm: {exc}",
                               "fold the BatchNorm layers yourself (torch.nn.utils.fusion.fuse_conv_bn_eval)") from exc
    for mod in fused.modules():
        weight, bias = getattr(mod, "weight", None), getattr(mod, "bias", None)
        if isinstance(weight, nn.Parameter) and isinstance(bias, nn.Parameter) and weight.requires_grad:
            bias.requires_grad_(True)
    return fused
