"""Capture model + loss as one ATen graph whose placeholders are the parameters, buffers and inputs.

Why `make_fx(..., pre_dispatch=True, tracing_mode="real")` over a `functional_call`:
- it records what actually runs (Python control flow is executed, not traced symbolically), so models
  with data-dependent branches, `*args` forwards and functional calls (`F.relu`, `torch.cat`, `x + y`)
  capture without changes - `torch.fx.symbolic_trace` fails on all of those;
- pre-dispatch keeps composite ops high level (`aten.linear`, `aten.conv2d`, `aten.batch_norm` with its
  `training` flag, `aten.layer_norm`, `aten.dropout`, `aten.flatten`, `aten.cross_entropy_loss`), which is
  exactly the level at which symmetry rules are stated; a post-dispatch graph would split BatchNorm
  into `native_batch_norm` + getitem and Linear into `t` + `addmm`, hiding the structure;
- it is tried first with fake tensors (shapes only: no forward pass at the example size, 3-4x faster on
  a ViT-B at 224); a forward that reads activation values into Python (`.item()`, `if t:`) fails there
  and is traced again with real tensors, which cost one forward pass and make such control flow work
  (`_error_on_data_dependent_ops=False`: the branch the example inputs take is recorded, and the
  detector warns that its groups hold for that branch). Before the real trace the model is run once
  eagerly, so a bad example input is reported as such. `node.meta["val"]` carries shapes for every node
  (as fake tensors) either way.
torch.export (non-strict) gives the same op set but uses fake tensors, so data-dependent control flow
fails; it is kept as the fallback when `make_fx` itself fails on an op.

The parameters enter as a flat list in `model.named_parameters()` order, so placeholder i maps back to
the i-th name (a shared parameter appears once, under its first name, and its placeholder has one user
per use). Buffers are cloned, and the global RNG state is restored, so capturing does not change the
model: running statistics, `num_batches_tracked`, train/eval mode and random streams stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from neural_mechanics.errors import CaptureError, InputShapeError
from neural_mechanics.symmetry.einsum import DECOMPOSITIONS
from neural_mechanics.symmetry.loss import LossLike, as_loss_spec
from neural_mechanics.symmetry.utils import as_args, quiet_logs


@dataclass
class CapturedGraph:
    """A captured model(+loss) graph and the map from its placeholders back to the model."""

    gm: torch.fx.GraphModule
    params: dict[torch.fx.Node, str]
    """parameter placeholder -> name in `model.named_parameters()`."""
    trainable: dict[str, bool]
    buffers: dict[torch.fx.Node, str]
    inputs: list[torch.fx.Node]
    mechanism: str
    loss: str
    input_shapes: list[tuple[int, ...]]
    model_outputs_are_graph_outputs: bool
    """True when no loss was captured (loss "mse"/None): the graph outputs are the model outputs."""
    notes: list[str] = field(default_factory=list)
    loss_detail: str = ""
    """The loss in words (`LossSpec.describe`): for a softmax loss, the class axis and positions it scores."""

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph


_SHAPE_HINTS = (
    "shape", "size", "dimension", "expected input", "mat1 and mat2", "channels", "must match", "Expected",
    "out of range", "too small", "cannot be multiplied",
)


def _check_runs(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: tuple) -> None:
    """Run the model once eagerly (buffers copied): a failure here is the input's fault, not the capture's."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            functional_call(model, (params, {k: v.clone() for k, v in buffers.items()}), inputs)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:  # torch._assert, `assert`
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
        what = f"the model rejected example inputs of shape {shapes}: {msg}"
        if isinstance(e, TypeError) and not any(h in str(e) for h in _SHAPE_HINTS):
            what = f"calling the model with {len(inputs)} example input(s) failed: {msg}"
        raise InputShapeError(
            what,
            "pass a batch (batch size >= 2) shaped like the data the model is trained on, as a tensor or "
            "a tuple of the forward's positional arguments",
        ) from e


def capture(model: nn.Module, example_inputs: Any, loss: LossLike = "cross_entropy") -> CapturedGraph:
    """Trace `loss(model(*inputs))` (or `model(*inputs)` for loss "mse"/None) into an ATen graph.

    `loss` is converted by `symmetry.loss.as_loss_spec`; what is traced after the model is
    `LossSpec.captured()` (for cross-entropy, the stand-in sum(log_softmax(logits, class axis))).
    Torch's tracing loggers are silenced meanwhile (`quiet_logs`): a failed fake-tensor trace logs its whole
    traceback, while the capture either succeeds another way or raises a clean error of its own.
    """
    with quiet_logs():
        return _capture(model, example_inputs, loss)


def _capture(model: nn.Module, example_inputs: Any, loss: LossLike) -> CapturedGraph:
    inputs = as_args(example_inputs)
    names = [n for n, _ in model.named_parameters()]
    plist = [p.detach() for _, p in model.named_parameters()]
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    bnames = [n for n, _ in model.named_buffers()]
    blist = [b.detach().clone() for _, b in model.named_buffers()]
    spec = as_loss_spec(loss)
    loss_fn = spec.captured()

    loss_detail: list[str] = []

    def f(params: list[Tensor], buffers: list[Tensor], *xs: Any) -> Any:
        state = (dict(zip(names, params, strict=True)), dict(zip(bnames, buffers, strict=True)))
        out = functional_call(model, state, xs)
        loss_detail.append(spec.describe(out))  # shapes only: the class axis and positions the loss scores
        return out if loss_fn is None else loss_fn(out)

    errors: list[str] = []
    gm = None
    mechanism = ""
    try:  # fast path: shapes only, no forward pass at the example size
        with torch.random.fork_rng(devices=[]):
            gm = _make_fx(f, plist, blist, inputs, "fake")
        mechanism = "make_fx(pre_dispatch=True, tracing_mode='fake')"
    except Exception:
        gm = None
    if gm is None:
        # data-dependent control flow (or a bad input): check the inputs eagerly, then trace for real
        _check_runs(model, dict(zip(names, plist, strict=True)), dict(zip(bnames, blist, strict=True)), inputs)
        mechanisms = (("make_fx(pre_dispatch=True, tracing_mode='real')", _make_fx),
                      ("torch.export(strict=False)", _export))
        for mech, trace in mechanisms:
            try:
                with torch.random.fork_rng(devices=[]):
                    gm = trace(f, plist, blist, inputs)
                mechanism = mech
                break
            except Exception as e:
                errors.append(f"{mech}: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    if gm is None:
        raise CaptureError(
            "could not capture the model as a graph; " + " | ".join(errors),
            "the operation named above stopped tracing: replace it by a traceable equivalent (no in-place "
            "ops on inputs, no .numpy()/.tolist() on activations), or pass a simpler loss callable",
        )

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    n_p, n_b = len(plist), len(blist)
    params = dict(zip(placeholders[:n_p], names, strict=True))
    buffers = dict(zip(placeholders[n_p : n_p + n_b], bnames, strict=True))
    return CapturedGraph(
        gm=gm,
        params=params,
        trainable=trainable,
        buffers=buffers,
        inputs=placeholders[n_p + n_b :],
        mechanism=mechanism,
        loss=spec.name,
        input_shapes=[tuple(x.shape) for x in inputs if isinstance(x, Tensor)],
        model_outputs_are_graph_outputs=loss_fn is None,
        loss_detail=loss_detail[-1] if loss_detail else spec.name,
    )


def _make_fx(
    f: Callable[..., Any], plist: Sequence[Tensor], blist: Sequence[Tensor], inputs: tuple, mode: str = "real"
) -> Any:
    """make_fx, pre-dispatch. mode "fake": shapes only (fast; fails on data-dependent reads such as
    `.item()`); "real": real tensors, data-dependent reads specialised to the example inputs.

    DECOMPOSITIONS: einsum as linear / matmul (einsum.py). The torch-function metadata mode (it records which torch
    function produced each node, `node.meta["torch_fn"]`, which nothing here reads) is off: one interposed Python
    call less for each of the ~35 torch-function calls per recorded op."""
    return make_fx(f, decomposition_table=DECOMPOSITIONS, pre_dispatch=True, tracing_mode=mode,  # type: ignore[arg-type]
                   _error_on_data_dependent_ops=False, _disable_torch_fn_metadata_mode=True)(
        list(plist), [b.clone() for b in blist], *inputs
    )


def _export(f: Callable[..., Any], plist: Sequence[Tensor], blist: Sequence[Tensor], inputs: tuple) -> Any:
    """Fallback: torch.export (non-strict) of the same function, unlifted to a plain GraphModule."""

    class _Wrap(nn.Module):
        def forward(self, params: list[Tensor], buffers: list[Tensor], *xs: Any) -> Any:  # pragma: no cover
            return f(params, buffers, *xs)

    ep = torch.export.export(_Wrap(), (list(plist), [b.clone() for b in blist], *inputs), strict=False)
    gm = ep.module()
    for node in list(gm.graph.nodes):  # the input-guard call reads every placeholder; it computes nothing
        if node.op == "call_module" and not node.users and "guard" in str(node.target):
            gm.graph.erase_node(node)
    return gm
