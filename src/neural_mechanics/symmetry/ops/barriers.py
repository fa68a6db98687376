"""Known barriers: ops the engine understands to block every channel by their nature.

An op without a record is a barrier too, but an *unknown* one: the engine cannot tell whether a symmetry
passes it, so the coverage report (SymmetrySet.meta["coverage"]) lists it as unsupported, something the user
can teach with `nm.register_op`. The ops here are known and block for a reason that no rule can remove:

- not positively homogeneous of degree 1, f(a x) != a f(x) for some a > 0 (GELU, SiLU, tanh, sigmoid, ReLU6
  and other clipped or smooth activations; exp, powers, roots, rounding): scaling a channel before the op
  changes what comes after it in a way no parameter can undo, so no scale or rescale group passes;
- recurrent layers fused into one op (aten::lstm, gru, rnn_tanh, rnn_relu): their gates are sigmoids and tanhs,
  and the engine derives nothing inside the fused op (not even for the ReLU RNN, whose hidden scale would need
  rows and columns of the recurrent matrix together); every channel reaching them is blocked.

`register_known_barriers` adds one record per op, with its reason as the summary, for every op that no family
module has given a rule: it runs once, after every family module is imported (ops/__init__.py), so a family
that later learns a real rule for one of these ops simply takes it over.
"""

from __future__ import annotations

from neural_mechanics.symmetry.ops.registry import builtin_rule, define, qualified

NOT_HOMOGENEOUS = "not positively homogeneous (f(a x) != a f(x) for a > 0), so no channel scale passes it"
RECURRENT = ("a recurrent layer fused into one op: sigmoid/tanh gates are not homogeneous and the engine derives "
             "no rule inside the fused op")

KNOWN_BARRIERS: dict[str, str] = {
    **{op: f"activation {NOT_HOMOGENEOUS}" for op in (
        "gelu", "silu", "sigmoid", "tanh", "hardtanh", "relu6", "hardswish", "hardsigmoid", "elu", "selu", "celu",
        "softplus", "mish", "log_sigmoid", "glu", "softshrink", "hardshrink", "threshold")},
    **{op: f"elementwise math {NOT_HOMOGENEOUS}" for op in (
        "exp", "log", "sqrt", "rsqrt", "pow", "square", "reciprocal", "erf", "sin", "cos", "sign", "round",
        "floor", "ceil", "logsumexp")},
    **{op: RECURRENT for op in ("lstm", "gru", "rnn_tanh", "rnn_relu")},
}
"""ATen op name -> why it blocks (the record's summary, shown in docs/ops.md and in the coverage report)."""


def register_known_barriers() -> None:
    """One barrier record per KNOWN_BARRIERS op that has no builtin rule yet (family "barriers")."""
    for name, why in KNOWN_BARRIERS.items():
        if builtin_rule(qualified(name)) is None:
            define(name, channel=None, family="barriers", summary=f"barrier: {why}")
