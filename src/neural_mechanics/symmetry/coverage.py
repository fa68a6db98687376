"""Coverage you can see: how much of a model its groups reach, and which ops stopped the rest.

`find_symmetries` stores `SymmetrySet.meta["coverage"]` (detect.py builds it from the rules' record of what
blocked moving channels):

    {"params_total": N, "params_in_groups": n, "param_fraction": n / N,
     "blocked_ops": {op (reason): how many calls blocked a channel},
     "unsupported_ops": [ops without a rule that blocked something: the user can teach them, nm.register_op],
     "barrier_ops": {op (reason): why the engine knows it blocks (ops/barriers.py, or the rule that decided)}}

params_total counts the entries of every parameter tensor (a shared tensor once, frozen ones included);
params_in_groups counts those in at least one group (any member of any kind), exactly, without building a
parameter-sized mask (so it runs on meta-device models): entries of a tensor whose members slice it along dims
d with index sets S_d are covered unless every coordinate avoids its S_d, so

    covered = numel - prod_d (n_d - |S_d|) * prod_(other dims) n_e,

and a tensor with block members (grouped convolutions) is counted on a boolean table over the dims they use.
`coverage_lines` and `empty_message` are the text every front end prints (`SymmetrySet.details()`,
`nmech symmetries`, `nmech check`, the HTML report): a model without groups is never reported as having "no
symmetry" when an unsupported op may be the cause.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

EXTENDING = "docs/extending.md"
"""Where a user learns to teach the engine an op (`nm.register_op`)."""

__all__ = ["EXTENDING", "coverage_lines", "covered_entries", "empty_message"]


def covered_entries(symmetries: Iterable[Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Per parameter with entries in a group: how many of its entries belong to at least one group (exact).

    symmetries: `Symmetry` objects (groups.py, which imports this module, so they are not annotated as such).
    """
    whole: set[str] = set()
    slices: dict[str, dict[int, set[int]]] = {}
    blocks: dict[str, list[tuple[int, tuple[int, ...], int, tuple[int, ...]]]] = {}
    # first the index tuples per (param, dim), in one cheap pass (a model has ~1e5 members); then the sets
    picked: dict[tuple[str, int], list[tuple[int, ...]]] = {}
    for s in symmetries:
        for m in s.members:
            if m.dim is None or m.index is None:
                whole.add(m.param)
            elif m.sub_dim is not None and m.sub_index is not None:
                nd = len(shapes[m.param])
                blocks.setdefault(m.param, []).append((m.dim % nd, m.index, m.sub_dim % nd, m.sub_index))
            else:
                key = (m.param, m.dim)
                got = picked.get(key)
                if got is None:
                    picked[key] = [m.index]
                else:
                    got.append(m.index)
    for (param, dim), indices in picked.items():
        if param not in whole:
            per_dim = slices.setdefault(param, {}).setdefault(dim % len(shapes[param]), set())
            for idx in indices:
                per_dim.update(idx)
    out = {p: math.prod(shapes[p]) for p in whole}
    for p in (set(slices) | set(blocks)) - whole:
        shape = tuple(int(n) for n in shapes[p])
        if p in blocks:
            out[p] = _count_on_table(shape, slices.get(p, {}), blocks[p])
            continue
        free = math.prod(n for d, n in enumerate(shape) if d not in slices[p])
        out[p] = math.prod(shape) - math.prod(shape[d] - len(idx) for d, idx in slices[p].items()) * free
    return {p: n for p, n in out.items() if n}  # a block member whose index sets do not meet covers nothing


def _count_on_table(shape: tuple[int, ...], slices: Mapping[int, set[int]],
                    blocks: list[tuple[int, tuple[int, ...], int, tuple[int, ...]]]) -> int:
    """Covered entries counted on a boolean table over the dims the members use (small: conv (out, in/groups))."""
    dims = sorted(set(slices) | {d for b in blocks for d in (b[0], b[2])})
    pos = {d: i for i, d in enumerate(dims)}
    table = torch.zeros([shape[d] for d in dims], dtype=torch.bool)
    for d, picked in slices.items():
        table.index_fill_(pos[d], torch.tensor(sorted(picked), dtype=torch.long), True)
    for d, idx, e, sub in blocks:
        if d == e:
            keep = sorted(set(idx) & set(sub))
            if keep:
                table.index_fill_(pos[d], torch.tensor(keep, dtype=torch.long), True)
            continue
        mark = torch.zeros_like(table)  # the block: idx along d and sub along e (all of the other dims)
        on_d = torch.zeros(shape[d], dtype=torch.bool)
        on_d[list(idx)] = True
        on_e = torch.zeros(shape[e], dtype=torch.bool)
        on_e[list(sub)] = True
        mark |= on_d.view([-1 if i == pos[d] else 1 for i in range(len(dims))])
        mark &= on_e.view([-1 if i == pos[e] else 1 for i in range(len(dims))])
        table |= mark
    free = math.prod(n for d, n in enumerate(shape) if d not in pos)
    return int(table.sum()) * free


def _ops_text(counts: Mapping[str, int], keys: Iterable[str]) -> str:
    return ", ".join(f"{k} x{counts.get(k, 0)}" for k in keys)


def coverage_lines(meta: Mapping[str, Any]) -> list[str]:
    """The coverage block of a SymmetrySet's meta, as lines of text (empty without meta["coverage"])."""
    cov = meta.get("coverage")
    if not isinstance(cov, Mapping):
        return []
    total, inside = int(cov.get("params_total", 0)), int(cov.get("params_in_groups", 0))
    frac = float(cov.get("param_fraction", inside / total if total else 0.0))
    lines = [f"coverage: {inside:,} of {total:,} parameter entries ({100 * frac:.1f}%) are in at least one group"]
    blocked: Mapping[str, int] = cov.get("blocked_ops") or {}
    unsupported = list(cov.get("unsupported_ops") or [])
    barriers: Mapping[str, str] = cov.get("barrier_ops") or {}
    if unsupported:
        lines.append(f"  blocked by ops the engine does not know (unsupported: teach them with nm.register_op, "
                     f"see {EXTENDING}): " + _ops_text(blocked, [k for k in blocked if _op_of(k) in unsupported]))
    if barriers:
        lines.append("  blocked by known barriers (ops that block by their nature):")
        lines += [f"    {k} x{blocked.get(k, 0)}: {why}" for k, why in barriers.items()]
    if not blocked:
        lines.append("  no op blocked a moving channel")
    return lines


def _op_of(key: str) -> str:
    """The op of a blocked_ops key: "aten.gelu" or "aten.batch_norm (eval mode: ...)" -> the part before " (" ."""
    return key.split(" (", 1)[0]


def empty_message(meta: Mapping[str, Any]) -> str:
    """What to say when no group was found: never "no symmetry" when an op the engine does not know blocked."""
    found = meta.get("coverage")
    cov: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    unsupported = list(cov.get("unsupported_ops") or [])
    barriers = list((cov.get("barrier_ops") or {}).keys())
    if unsupported:
        return (f"No group found, which does NOT mean the model has no symmetry: the engine does not know "
                f"{', '.join(unsupported)}, which blocked every channel reaching it. If you know what such an op "
                f"does, teach it with nm.register_op (see {EXTENDING}), then run again.")
    if barriers:
        return ("No symmetry found: every channel is blocked by an op that blocks by its nature ("
                + ", ".join(barriers) + "), and no softmax-fed linear layer gives a translation.")
    return ("No symmetry found: no softmax-fed linear layer, no normalisation, no positively homogeneous neuron, "
            "and no op blocked a moving channel.")
