"""Where values end: softmax over the classes (the translation engine's sinks) and reads into Python (leaks).

softmax, log_softmax and the cross-entropy loss are barriers for channel scaling (not homogeneous) and the
sinks of the translation engine: softmax(z + s 1) = softmax(z) for a per-sample shift s shared by every
entry along the softmax axis. Ops through which a value leaves the graph into Python (`.item()`, `if t:`,
`.numpy()`) count as outputs: the branch or constant Python derives from the value may change under a
group action, so every channel that reaches one is blocked (rules.py).
"""

from __future__ import annotations

from torch.fx import Node

from neural_mechanics.symmetry.analysis import ndim_of
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.registry import Flag, Shift, canonical, define


def softmax_dim(node: Node) -> int:
    """The axis a softmax sink normalises over (cross-entropy: the class axis, 1, or 0 for 1-D logits)."""
    args = op_args(node)
    nd = ndim_of(args["input"])
    if canonical(node) == "aten::cross_entropy_loss":
        return 1 if nd >= 2 else 0
    d = int(args.get("dim", -1))
    return d % nd if nd else 0


define("softmax", "_softmax", "log_softmax", "_log_softmax", "cross_entropy_loss", channel=None, shift=Shift.SOFTMAX,
       family="sinks", summary="barrier (not homogeneous); the translation engine's softmax sink")
define("item", "_local_scalar_dense", "resolve_neg", "resolve_conj", "is_nonzero", "equal", channel=None,
       flags={Flag.LEAK}, family="sinks",
       summary="barrier; the value leaves into Python, so it counts as an output (leak)")
