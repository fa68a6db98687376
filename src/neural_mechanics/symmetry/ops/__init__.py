"""The op-rule table: how each ATen op moves, ties, writes, reads or normalises channel slots.

Scaling a set K of slots by alpha > 0 (every activation entry labelled with a slot of K multiplied by
alpha, nothing else changed) leaves the loss unchanged when every op is consistent with it:

- pass-through ops are positively homogeneous of degree 1 per entry (relu, leaky_relu, dropout, max /
  avg pooling, interpolation, mul/div by something that does not move): the output entry keeps the
  input entry's slot (elementwise.py);
- index maps (view, flatten, permute, cat, split, pad, ...) move entries: they are replayed on the
  label tensors (index_maps.py, graph.py);
- add / sub / maximum of two activations and homogeneous reductions (sum, mean, pooling windows) mix
  entries: the slots they mix are united (one class, scaled together) (elementwise.py);
- writers make fresh output slots that scale with a parameter slice (conv/linear rows and bias, affine
  of BatchNorm/LayerNorm/GroupNorm, a parameter used directly as an activation, a layer-scale mul);
- readers are linear in an input channel through a parameter slice (conv/linear columns, depthwise
  rows, layer-scale entries), which absorbs the scale when divided by alpha (linear.py, layer_scale.py);
- normalisers (train-mode BatchNorm per channel, LayerNorm/RMSNorm per row, GroupNorm per group)
  are invariant when whole normalisation groups scale together: their groups are united (norms.py);
- contractions of two moving factors (attention scores q k^T) pair query and key channels (attention.py);
- anything else is a barrier: its input slots are joined to INVARIANT (tainted) and its output is
  INVARIANT (it does not move under any valid action, since every class feeding it is tainted). An op
  without a rule is a barrier, and counts in `SymmetrySet.meta["blocked_ops"]` when it stops a moving
  channel (sinks.py holds the softmax sinks and the ops that leak values into Python); the coverage report
  tells those unknown ops (unsupported: teach them with `register_op`) from known barriers, ops that block
  by their nature (barriers.py: GELU, tanh, fused LSTM/GRU, ...; a rule that decides to block, such as
  eval-mode BatchNorm or queries and keys that do not pair up).

Parameters that are frozen or used by more than one op never enter a group: a writer or reader whose
parameter cannot be scaled acts as a barrier for that role.

Each op has one record (`OpRule`, registry.py) with its channel rule, its softmax-shift rule for the
translation engine (`Shift`) and its flags; the family modules fill the table with `@register`, rules read
arguments by name (args.py), and users teach the engine their own ops with `register_op` (user.py,
docs/extending.md). docs/ops.md lists every record (scripts/ops_table.py writes it from this table).
"""

from neural_mechanics.symmetry.ops import attention, barriers, elementwise, index_maps, linear, norms, sinks
from neural_mechanics.symmetry.ops.args import op_args
from neural_mechanics.symmetry.ops.registry import (
    ChannelRule,
    Flag,
    OpRule,
    OpRuleError,
    Shift,
    ShiftRule,
    canonical,
    rule_for,
    rule_of,
    rules,
    shift_kind,
)
from neural_mechanics.symmetry.ops.user import READY_RULES, Registration, register_op, unregister_op

barriers.register_known_barriers()  # last, after every family module above has registered its rules

FAMILIES = (linear, norms, index_maps, elementwise, attention, sinks, barriers)
"""The modules that register the builtin rules (importing this package fills the table)."""

__all__ = [
    "FAMILIES",
    "READY_RULES",
    "ChannelRule",
    "Flag",
    "OpRule",
    "OpRuleError",
    "Registration",
    "Shift",
    "ShiftRule",
    "canonical",
    "op_args",
    "register_op",
    "rule_for",
    "rule_of",
    "rules",
    "shift_kind",
    "unregister_op",
]
