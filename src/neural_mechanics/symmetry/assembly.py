"""Channel classes -> symmetry groups: the assembly step of `find_symmetries` (detect.py).

After the op rules (ops/, run by rules.py) have labelled the graph, every class K of channel slots not joined to
INVARIANT can be scaled by alpha > 0 without changing the loss, compensating every reader by 1/alpha:

- K has readers (next layer's input slices)   -> "rescale": A1 = writers of K, A2 = readers of K;
- K has no readers but a train-mode normaliser absorbs it -> "scale": A = writers of K;
- K has neither (its value is never used)     -> skipped (counted in meta["unused_classes"]).

Query/key pairs (ops/attention.py's QKPair: a query channel class and a key channel class met only at one
coordinate of an attention contraction) are rescale groups of their own: A1 = the query writers, A2 = the
key writers (`qk_groups`). Translation groups come from translation.py (softmax) and key_bias.py (attention
keys): `translation_groups`.

Each group gets a unique name (the first writer's layer and index, "#n" for repeats), its members (one per
parameter slice, merged per parameter and role) and its chain (the events that tie it together, for
`.details()`). Tens of thousands of classes per model pass through `channel_groups`, so it is written for
speed (see its docstring); nothing here looks at parameter names except to report them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from neural_mechanics.symmetry.analysis import Analysis, Contribution, Role, module_of, oriented_classes
from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.key_bias import find_key_bias_sites
from neural_mechanics.symmetry.member import Member, short_index
from neural_mechanics.symmetry.ops.attention import QKPair
from neural_mechanics.symmetry.translation import find_translation_sites

__all__ = ["MAX_CHAIN", "channel_groups", "qk_groups", "translation_groups"]

MAX_CHAIN = 40
"""At most this many lines in a group's chain (the rest is summarised in one line)."""


def _key(param: str) -> str:
    """Readable group-name stem: 'features.0.weight' -> 'features.0'; other names stay whole."""
    return param[: -len(".weight")] if param.endswith(".weight") else param


def _members(contribs: list[Contribution], scale: bool = False) -> tuple[Member, ...]:
    """Merge contributions into one Member per (param, dim, role); a whole-tensor member absorbs slices.

    Block contributions (grouped convolutions: `param[rows][sub]`) merge per (param, role, rows, sub dim)
    into one Member with the union of their sub indices; a whole-tensor member absorbs them too.
    scale: the members of a scale group, which carry no role (merged as they are, the role set to None).
    """
    simple = True
    seen = set()
    for c in contribs:
        if c.sub is not None or (c.index is not None and len(c.index) != 1) or (c.param, c.role) in seen:
            simple = False
            break
        seen.add((c.param, c.role))
    if simple:  # one slice per param: as is
        return tuple(Member.trusted(c.param, c.dim, c.index, None if scale else c.role) for c in contribs)
    merged: dict[tuple[str, Role], dict[int | None, set[int]]] = defaultdict(dict)
    blocks: dict[tuple[str, Role, int, tuple[int, ...], int], set[int]] = {}
    for c in contribs:
        if c.sub is not None and c.dim is not None and c.index is not None:
            blocks.setdefault((c.param, c.role, c.dim, c.index, c.sub[0]), set()).update(c.sub[1])
            continue
        per_dim = merged[(c.param, c.role)]
        per_dim.setdefault(c.dim, set()).update(c.index or ())
    out = []
    for (param, role), per_dim in merged.items():
        r = None if scale else role
        if None in per_dim or len(per_dim) > 1:
            out.append(Member.trusted(param, None, None, r))
            continue
        ((dim, idx),) = per_dim.items()
        out.append(Member.trusted(param, dim, tuple(sorted(idx)), r))
    whole = {(param, role) for (param, role), per_dim in merged.items() if None in per_dim or len(per_dim) > 1}
    for (param, role, dim, rows, sub_dim), sub in blocks.items():
        if (param, role) not in whole:
            out.append(Member.trusted(param, dim, rows, None if scale else role, sub_dim, tuple(sorted(sub))))
    return tuple(out)


def _fill(template: str, ix: list[int]) -> str:
    """An event template with "{idx}" replaced by the merged indices ("all" for a whole tensor)."""
    if "{idx}" not in template:
        return template
    if not ix:
        return template.replace("{idx}", "all")
    return template.replace("{idx}", str(ix[0]) if len(ix) == 1 else short_index(tuple(sorted(set(ix)))))


def _fill_one(template: str, index: tuple[int, ...] | None) -> str:
    """`_fill` for one contribution of one index (or a whole tensor: None), without building a list."""
    if "{idx}" not in template:
        return template
    return template.replace("{idx}", "all" if index is None else str(index[0]))


def _steps(writer_lines: list[str], extra: list[str], reader_lines: list[str]) -> tuple[str, ...]:
    """A chain: the writers' lines, then what ties the class together (each line once), then the readers';
    at most MAX_CHAIN lines, the rest summarised in one."""
    steps = [*writer_lines, *dict.fromkeys(extra), *reader_lines]
    if len(steps) > MAX_CHAIN:
        steps = [*steps[:MAX_CHAIN], f"... ({len(steps) - MAX_CHAIN} more steps)"]
    return tuple(steps)


def _chain(contribs: list[Contribution], extra: list[str]) -> tuple[str, ...]:
    """Merge the contributions' event templates ("{idx}" -> merged indices) into readable lines.

    Writers first, then what ties the class together (residual additions, concatenations, normalisers),
    then the readers.
    """
    lines: dict[str, list[int]] = {}
    readers: dict[str, list[int]] = {}
    for c in contribs:
        into = lines if c.role == "in" else readers
        ix = into.get(c.event)
        if ix is None:
            into[c.event] = list(c.index) if c.index else []
        elif c.index:
            ix.extend(c.index)
    return _steps([_fill(t, ix) for t, ix in lines.items()], extra, [_fill(t, ix) for t, ix in readers.items()])


def _simple_class(contribs: list[Contribution], scale: bool, extra: list[str]
                  ) -> tuple[tuple[Member, ...], tuple[str, ...]] | None:
    """(members, chain) of a class whose contributions need no merging, in one pass; None for the others.

    No merging: each contribution is one index (or the whole tensor) of a parameter that no other contribution
    of the same role touches. Then `_members(writers) + _members(readers)` is one member per contribution
    (writers first) and `_chain` one line per distinct event; this builds exactly those, without the
    intermediate lists (most rescale classes are like this: a channel and the next layer's input slice).
    """
    trusted_member = Member.trusted
    seen: set[tuple[str, str]] = set()
    w_members: list[Member] = []
    r_members: list[Member] = []
    w_lines: dict[str, str] = {}
    r_lines: dict[str, str] = {}
    for c in contribs:
        idx, role = c.index, c.role
        if c.sub is not None or (idx is not None and len(idx) != 1):
            return None
        key = (c.param, role)
        if key in seen:
            return None
        seen.add(key)
        m = trusted_member(c.param, c.dim, idx, None if scale else role)
        ev = c.event
        if role == "in":
            w_members.append(m)
            lines = w_lines
        else:
            r_members.append(m)
            lines = r_lines
        if ev in lines:  # the same event twice: _chain merges the indices (rare; done the general way)
            return None
        lines[ev] = _fill_one(ev, idx)
    return tuple(w_members) + tuple(r_members), _steps(list(w_lines.values()), extra, list(r_lines.values()))


def channel_groups(a: Analysis, meta: dict[str, Any]) -> list[Symmetry]:
    """One group per channel class with writers (see the module docstring), in order of first contribution.

    This runs once per class of the whole model (tens of thousands), so it is written for speed: class roots
    for every slot at once (`UnionFind.roots`), names made unique with a counter, members and groups built with
    their trusted constructors (the values are valid by construction), and the most common class - one writer
    slice, absorbed by a normaliser (a conv channel before BatchNorm) - without the general merging.
    """
    root = a.uf.roots()
    by_root = oriented_classes(a, root_of=root)  # roles as seen from each class's own factor (ties flip them)
    normalisers: dict[int, list[str]] = {}
    for s, events in a.normalised.items():
        normalisers.setdefault(root[s], []).extend(events)
    couplings: dict[int, list[str]] = {}
    for s, text in a.couplings:
        couplings.setdefault(root[s], []).append(text)

    keys: dict[str, str] = {}
    layers: dict[str, str] = {}
    groups: list[Symmetry] = []
    used: dict[str, int] = {}
    """stem -> how many names start with it ("stem", then "stem#1", "stem#2", ...)."""
    unused = 0
    overlaps: list[str] = []
    trusted_member, trusted_group = Member.trusted, Symmetry.trusted
    no_lines: list[str] = []
    for r, contribs in by_root.items():
        if len(contribs) == 1:
            first = contribs[0]
            if first.role != "in":
                continue
            has_readers = False
        else:
            writer, has_readers = None, False
            for c in contribs:
                if c.role != "in":
                    has_readers = True
                elif writer is None:
                    writer = c
            if writer is None:
                continue
            first = writer
        key = keys.get(first.param)
        if key is None:
            key = keys[first.param] = _key(first.param)
        if first.sub is not None:  # a block (grouped transposed conv): name it by both restrictions
            stem = f"{key}[{short_index(first.index)};{short_index(first.sub[1])}]"
        else:
            stem = f"{key}[{'*' if first.index is None else first.index[0]}]"
        n = used.get(stem, 0)
        used[stem] = n + 1
        if n:
            stem = f"{stem}#{n}"
        if has_readers and ({c.param for c in contribs if c.role == "in"}
                            & {c.param for c in contribs if c.role != "in"}):
            overlaps.append(stem)
            continue
        if has_readers:
            kind = "rescale"
        elif r in normalisers:
            kind = "scale"
        else:
            unused += 1
            continue
        layer = layers.get(first.param)
        if layer is None:
            layer = layers[first.param] = module_of(first.param)
        coupled = couplings.get(r)
        extra = normalisers.get(r, no_lines) if coupled is None else coupled + normalisers.get(r, no_lines)
        idx = first.index
        if len(contribs) == 1 and first.sub is None and (idx is None or len(idx) == 1):
            # one writer slice: one member, one line for it, then what ties the class (as _members / _chain do)
            members: tuple[Member, ...] = (trusted_member(first.param, first.dim, idx, None),)
            chain = _steps([_fill_one(first.event, idx)], extra, no_lines)
        else:
            scale = kind == "scale"
            simple = _simple_class(contribs, scale, extra)
            if simple is not None:
                members, chain = simple
            else:
                writers = [c for c in contribs if c.role == "in"]
                readers = [c for c in contribs if c.role != "in"]
                members = _members(writers, scale) + (_members(readers, scale) if readers else ())
                chain = _chain(contribs, extra)
        groups.append(trusted_group(kind, f"{kind}:{stem}", members, layer, chain))
    meta["unused_classes"] = unused
    if overlaps:
        meta["skipped_overlapping"] = overlaps
    return groups


def _qk_stem(contribs: list[Contribution]) -> str:
    first = contribs[0]
    return f"{_key(first.param)}[{'*' if first.index is None else first.index[0]}]"


def _qk_group(pair: QKPair) -> Symmetry:
    """rescale: alpha on the query writers (A1), 1/alpha on the key writers (A2) of one score coordinate."""
    key = [Contribution(c.slot, c.param, c.dim, c.index, "out", c.event, c.sub) for c in pair.key]
    stem = f"{_qk_stem(pair.query)}~{_qk_stem(pair.key)}"
    return Symmetry(
        kind="rescale",
        name=f"rescale:{stem}",
        members=_members(pair.query) + _members(key),
        layer=module_of(pair.query[0].param),
        chain=_chain([*pair.query, *key], [pair.text]),
    )


def qk_groups(a: Analysis, taken: set[str]) -> list[Symmetry]:
    """One rescale group per query/key pair (names made unique against `taken`, the other groups' names)."""
    groups = []
    for pair in a.qk_pairs:
        g = _qk_group(pair)
        if g.name in taken:
            n = sum(1 for t in taken if t.startswith(g.name))
            g = Symmetry(g.kind, f"{g.name}#{n}", g.members, g.layer, g.chain)
        taken.add(g.name)
        groups.append(g)
    return groups


def translation_groups(a: Analysis) -> list[Symmetry]:
    groups = []
    for site in find_translation_sites(a):
        chain = (*site.path, "softmax(z + s) = softmax(z) for a shift s shared by all classes of a sample")
        if site.weight is not None:
            layer = module_of(site.weight)
            key = _key(site.weight)
            for j in range(site.n_in):
                where = f"[:,{j}]" if site.in_dim == 1 else f"[{j}]"
                groups.append(Symmetry("translation", f"translation:{key}{where}",
                                       (Member(site.weight, site.in_dim, (j,)),), layer, chain))
        if site.bias is not None:
            groups.append(Symmetry("translation", f"translation:{site.bias}", (Member(site.bias),),
                                   module_of(site.bias), chain))
    for kb in find_key_bias_sites(a):
        layer = module_of(kb.bias)
        for j in kb.coords:
            groups.append(Symmetry("translation", f"translation:{kb.bias}[{j}]", (Member(kb.bias, 0, (j,)),),
                                   layer, kb.path))
    return groups
