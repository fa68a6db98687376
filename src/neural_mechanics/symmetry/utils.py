"""Running a model numerically without touching it: the float64 working copy and the inputs it is fed.

This is the bottom utilities layer that certification (symmetry/certify.py), graph capture
(symmetry/capture.py) and the gradient/Hessian constraint checks (neural_mechanics.constraints) share;
its sibling symmetry/incidence.py is the compiled group-incidence kernel of the same layer. It imports
nothing from the package but `errors`, so every layer above may use it.

* `working_copy(model)`: a deep copy in float64 on which every numeric check runs, with normalisation
  eps set to a negligible value (the eps breaks scale symmetry by ~eps / var; the copy removes that
  physics so that what remains is rounding) and train-mode BatchNorm no longer updating its running
  statistics (outputs unchanged; torch.func transforms stay free of in-place buffer updates).
* `as_args(inputs)`: the positional arguments of `model(*args)` (a tensor is a 1-tuple);
  `cast_inputs(args, dtype, device)`: floating tensors to the copy's dtype, integer tensors (token ids)
  only moved.
* `fixed_rng(seed, device)`: the same dropout masks in every evaluation, the caller's RNG restored.
* `quiet_logs()`: torch's tracing loggers silenced while a capture is attempted (a failed fake-tensor trace
  logs its traceback before the capture reports a clean error or succeeds another way).
* `KeepFloat64`: inside the float64 copy's forward, casts to a lower floating precision (an RMS norm's
  `x.to(torch.float32)`, `softmax(..., dtype=torch.float32)`) stay in float64, so that what remains is float64
  rounding, not float32's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from neural_mechanics.errors import InputShapeError

NEGLIGIBLE_EPS = 1e-20
"""Normalisation eps used on the float64 copy: << any realistic batch variance, so the eps breaking
of scale symmetry (relative size ~ eps / var) falls far below float64 rounding."""

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

Inputs = Tensor | Sequence[Any]

__all__ = [
    "NEGLIGIBLE_EPS",
    "NORM_TYPES",
    "Inputs",
    "as_args",
    "cast_inputs",
    "eval_mode_batchnorms",
    "fixed_rng",
    "model_device",
    "parameter_dict",
    "quiet_logs",
    "working_copy",
]


def as_args(inputs: Inputs) -> tuple[Any, ...]:
    """Positional arguments for `model(*args)`: a tensor becomes a 1-tuple, a list/tuple is kept.

    Anything else (a dict, a string) raises `InputShapeError` (an `NMechError`).
    """
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise InputShapeError(
        f"example inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}",
        "pass one example batch as a tensor (e.g. torch.randn(4, 3, 32, 32)), or a tuple of the positional "
        "arguments of model.forward",
    )


def cast_inputs(args: Iterable[Any], dtype: torch.dtype, device: torch.device | None) -> tuple[Any, ...]:
    """Floating tensors -> `dtype` (and `device`); integer tensors only moved; other values unchanged."""
    out = []
    for a in args:
        if isinstance(a, Tensor):
            a = a.to(device=device) if device is not None else a
            if a.is_floating_point() or a.is_complex():
                a = a.to(dtype)
        out.append(a)
    return tuple(out)


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device | None) -> Iterator[None]:
    """Run a block under a forked RNG seeded with `seed` (same dropout masks every time; the
    caller's global RNG state is restored afterwards)."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


TRACING_LOGGERS = ("torch._subclasses", "torch.fx.experimental", "torch._dynamo", "torch._export", "torch.export",
                   "torch._functorch")
"""Loggers of torch's tracing machinery. A trace that fails under fake tensors makes
`torch._subclasses.fake_tensor` log the whole traceback at ERROR level ("failed while attempting to run meta
for aten.mm.default"), before the capture falls back to a real trace or reports a clean error of its own."""


@contextlib.contextmanager
def quiet_logs(prefixes: Sequence[str] = TRACING_LOGGERS) -> Iterator[None]:
    """Silence the loggers named by `prefixes` and their children for the block (levels restored afterwards).

    Each logger's level is raised above CRITICAL, so its records are not even created; existing child loggers
    with their own level (torch._logging sets some) are raised too. Children without a level of their own
    inherit the raised level and are left alone (every `setLevel` clears the cache of every logger).
    """
    manager = logging.Logger.manager
    names = {n for n, lg in manager.loggerDict.items()
             if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET
             and any(n.startswith(p + ".") for p in prefixes)}
    loggers = [logging.getLogger(n) for n in sorted(names | set(prefixes))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def eval_mode_batchnorms(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules that normalise with running statistics (eval mode)."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and not m.training
        and m.track_running_stats
        and m.running_mean is not None
    ]


def working_copy(
    model: nn.Module, dtype: torch.dtype = torch.float64, norm_eps: float | None = NEGLIGIBLE_EPS
) -> tuple[nn.Module, list[str]]:
    """A deep copy of `model` in `dtype` on which the checks run; the original is never touched.

    On the copy only: every normalisation layer's eps (`EPS_ATTRIBUTES` of a torch norm or of a module whose
    class is named *Norm*, such as Hugging Face's LlamaRMSNorm) is set to `norm_eps` (None keeps the model's
    eps, to measure the breaking it causes, relative size ~ eps / batch variance), and train-mode
    BatchNorm stops updating running statistics (it normalises with batch statistics either way, so
    outputs are unchanged; this keeps torch.func transforms free of in-place buffer updates).
    Returns the copy and notes saying what was changed.
    """
    work = copy.deepcopy(model).to(dtype)
    notes: list[str] = []
    changed: list[str] = []
    for name, m in work.named_modules():
        attr = _eps_attribute(m) if norm_eps is not None else None
        if attr is not None:
            old = getattr(m, attr)
            setattr(m, attr, norm_eps)
            changed.append(f"{name or type(m).__name__} (eps {old})")
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.track_running_stats = False
    if dtype == torch.float64:
        _keep_float64(work)
    if changed:
        notes.append(
            f"normalisation eps set to {norm_eps:g} on the {_dtype_name(dtype)} copy only, for "
            + ", ".join(changed[:8])
            + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            + "; the model's real eps breaks scale symmetry by ~eps/var (physics, visible to the tracker)"
        )
    return work, notes


EPS_ATTRIBUTES = ("eps", "variance_epsilon")
"""Where normalisation layers keep their eps: torch's and timm's `eps`; Hugging Face's hand-written RMS norms
(LlamaRMSNorm, T5LayerNorm, ...) `variance_epsilon`."""


def _eps_attribute(m: nn.Module) -> str | None:
    """The name of a normalisation layer's float eps attribute: a torch norm (NORM_TYPES) or a class named *Norm*."""
    if not (isinstance(m, NORM_TYPES) or "Norm" in type(m).__name__):
        return None
    for attr in EPS_ATTRIBUTES:
        if isinstance(getattr(m, attr, None), float):
            return attr
    return None


_LOW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_DOWNCASTS = {torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16}
_TO, _TYPE = torch.Tensor.to, torch.Tensor.type


def _promote(value: Any) -> Any:
    return torch.float64 if value in _LOW_FLOATS else value


class KeepFloat64(TorchFunctionMode):
    """A torch-function mode under which a call that reads a float64 tensor keeps float64 wherever it asks for a
    lower floating dtype (`x.to(torch.float32)`, `x.float()`, `softmax(x, dtype=torch.float32)`).

    Models compute parts of their forward in float32 on purpose (Hugging Face's RMS norms, softmaxes), which on
    the float64 working copy would leave float32 rounding (~1e-7) in every certification. Promoting those casts
    changes no value beyond rounding: the model computes the same function, in float64.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _DOWNCASTS:
            if args[0].dtype == torch.float64:
                return args[0]
        elif func is _TO or func is _TYPE:
            if args[0].dtype == torch.float64:
                args = tuple(_promote(a) for a in args)
                kwargs = {k: _promote(v) if k == "dtype" else v for k, v in kwargs.items()}
        elif kwargs.get("dtype") in _LOW_FLOATS and any(
                isinstance(a, Tensor) and a.dtype == torch.float64 for a in args):
            kwargs = {**kwargs, "dtype": torch.float64}
        return func(*args, **kwargs)


def _keep_float64(work: nn.Module) -> None:
    """Run the copy's forward under `KeepFloat64` (an instance attribute shadows the class's forward)."""
    forward = work.forward

    def forward_in_float64(*args: Any, **kwargs: Any) -> Any:
        with KeepFloat64():
            return forward(*args, **kwargs)

    work.forward = forward_in_float64  # type: ignore[method-assign]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parameter_dict(model: nn.Module) -> dict[str, Tensor]:
    """name -> detached parameter, in `model.named_parameters()` order (a shared parameter once)."""
    return {n: p.detach() for n, p in model.named_parameters()}
