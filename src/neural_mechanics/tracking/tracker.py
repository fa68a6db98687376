"""The streaming Tracker: measured charges next to exact and paper predictions, every step, on the device.

`Tracker(model, optimizer, symmetries, run_dir)` attaches to a stock torch.optim optimizer through
`register_step_pre_hook` / `register_step_post_hook` (no forked optimizer, no patched `step`), so whatever
the training loop does to the gradients before `step()` (global-norm clipping, accumulation, AMP unscaling)
is what it sees, and it reads lr / momentum / dampening / weight decay from `optimizer.param_groups` at every
step (any scheduler works).

Per step the tracker reads as little memory as the recurrences allow (docs/theory.md section 5 notation):

    d = g + lambda theta,   b_k = beta b_{k-1} + (1 - tau) d  (b_0 = d),   u = d | b_k | d + beta b_k
    B_k = <D theta, g>,  U_k = <u, D u>,  V_k = <D u, b_k>,  grad_sq = <g, D g>,  velocity_sq = <b_k, D b_k>

* heavy ball: B_k at the pre hook and U_k = V_k = velocity_sq = <b_k, D b_k> from torch's own updated buffer
  at the post hook: 2 products per tracked parameter;
* plain SGD, Nesterov, mixed: B_k, gg = <g, D g> and (with momentum) gb = <g, D b_{k-1}> at the pre hook;
  everything else is exact algebra on quantities the recurrence already carries (its C_k, P_k = <D theta_k,
  b_{k-1}> and the previous velocity_sq), see `_derived`: 2 (plain) or 3 (Nesterov) products;
* translation groups: B_k = <1_A, g> (no product);
* log steps add <theta, D theta> (the measured charge) and the unsigned norms from the same cells.

Each product is formed once per parameter and reduced onto every slicing key that parameter has, in float32
within a slice and float64 across slices (`symmetry/incidence.py`, the incidence engine shared with the
geometry checks); parameters in no group cost nothing. Three predictions per group advance every step:
`predicted_exact` (the exact recurrence with B = 0: what the symmetry alone implies), `predicted_breaking`
(the same recurrence fed the measured B_k, i.e. it should match the measurement to float rounding) and
`predicted_paper` (the continuous model of section 3). Quantities stay on the device in float64; the host
only sees them at log steps (one transfer per log step).

Groups the recurrence does not apply to are flagged, never silently mispredicted: members in param groups
with different hyperparameters, a member parameter missing from the optimizer, or a member without a
gradient in some step (torch then skips it) -> NaN predictions, `valid=False`, and the reason in the
manifest. For optimizers without exact theory (Adam, AdamW, RMSprop, ...; also SGD with `maximize` is
handled exactly) the tracker measures, at log steps, the optimizer's own breaking term <D theta_k, u_k> with
u_k = (theta_k - theta_{k+1}) / eta_k; that needs a copy of every tracked parameter at the pre hook of a log
step (the memory cost of an extra model copy, only then).

Rows written for a logged step s: measured charge at theta_s, the predictions for s, `breaking` =
predicted_breaking - predicted_exact (accumulated effect of breaking), `breaking_term` = B_s (SGD) or
<D theta_s, u_s> (other optimizers), `angular_update` = |theta_{s+1} - theta_s| / |theta_s| (scale groups),
`norm` = the denominator of the relative error (|C| for scale, |theta_A1|^2 + |theta_A2|^2 for rescale,
sum |theta| over the group for translation) and `grad_norm` = |g_A|. The layers frame's err_* columns divide
by max(norm, RELATIVE_ERROR_FLOOR x the group's largest norm so far), see `relative_errors`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.groups import Symmetry, SymmetrySet
from neural_mechanics.symmetry.incidence import Factor, GroupIncidence
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.theory.continuous import PaperPrediction
from neural_mechanics.theory.exact import LinearRecurrence, QuadraticRecurrence
from neural_mechanics.theory.hyper import Hyper
from neural_mechanics.tracking.store import RunWriter

STATE_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TINY = 1e-30
_HP_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def canonical_name(name: str) -> str:
    """A parameter name without wrapper prefixes ("module." of DDP / DataParallel, "_orig_mod." of torch.compile)."""
    changed = True
    while changed:
        changed = False
        for pre in _WRAPPER_PREFIXES:
            if name.startswith(pre):
                name, changed = name[len(pre):], True
    return name


def resolve_parameters(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """Map symmetry member names to the model's parameters, tolerating wrapper prefixes on either side."""
    named = dict(model.named_parameters())
    canon: dict[str, nn.Parameter] = {}
    for n, param in named.items():
        canon.setdefault(canonical_name(n), param)
    out: dict[str, nn.Parameter] = {}
    for name in names:
        p: nn.Parameter | None = named.get(name)
        if p is None:
            p = canon.get(canonical_name(name))
        if p is None:
            raise TrackerError(f"symmetry member names parameter {name!r}, which the model does not have",
                               "detect the symmetries on this model (or the model it wraps): names must match "
                               "model.named_parameters() up to a 'module.' prefix")
        out[name] = p
    return out


def _is_spaced(k: int, per_decade: int = 8) -> bool:
    """True at about `per_decade` log-spaced steps per decade (1, 2, 3, 4, 5, 6, 7, 10, 13, 18, 24, ...)."""
    if k <= 0:
        return k == 0
    j = round(per_decade * math.log10(k))
    return any(round(10 ** (i / per_decade)) == k for i in (j - 1, j, j + 1) if i >= 0)


class _Family:
    """The groups of one charge type (quadratic: scale + rescale; linear: translation), compiled."""

    def __init__(self, syms: list[Symmetry], quadratic: bool, shapes: Mapping[str, torch.Size],
                 device: torch.device):
        self.syms = syms
        self.quadratic = quadratic
        self.names = [s.name for s in syms]
        self.kinds = np.array([s.kind for s in syms], dtype=object)
        self.layers = np.array([s.layer for s in syms], dtype=object)
        self.n = len(syms)
        self.table = GroupIncidence(syms, shapes, device, error=TrackerError)
        self.is_scale = torch.tensor([s.kind == "scale" for s in syms], dtype=torch.bool, device=device)
        self.is_rescale = torch.tensor([s.kind == "rescale" for s in syms], dtype=torch.bool, device=device)
        self.valid = torch.ones(self.n, dtype=torch.bool, device=device)
        self.exact: Any = None
        self.breaking: Any = None
        self.paper: Any = None
        self.vel: Tensor | None = None
        """<b_{k-1}, D b_{k-1}> per group (carried between steps; None = measure it when next needed)."""
        self.pending: dict[str, Tensor] | None = None
        self.mode = "general"
        self.hp: Hyper | None = None
        self.B: Tensor | None = None
        self.norm_max = np.zeros(self.n, dtype=np.float64)
        """Host: largest `norm` logged so far per group (the relative-error floor, `error_denominator`)."""
        self.pgs: list[int] = []


class Tracker:
    """Watch every symmetry's charge during training, next to its exact and paper predictions.

        with nm.Tracker(model, optimizer, symmetries, "runs/a", log_every=10) as tracker:
            for x, y in loader:
                optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
                tracker.log_metrics(tracker.step, loss=loss.item())

    `state_dict()` / `load_state_dict()` work like an optimizer's: checkpoint them with the model and the
    optimizer, and a run resumed into the same run_dir continues (rows from the checkpoint step on are
    replaced, see `store.py`) with predictions identical to an uninterrupted run. Under DDP build one Tracker
    per rank on the wrapped model; only rank 0 writes.
    """

    hook_threads: int | None = 1
    """Torch intra-op threads inside the hooks on CPU (restored after; None = leave torch's setting). The hooks'
    work is a few dozen memory-bound passes, which gain little from threads; on a machine whose cores are busy
    every multi-threaded op can wait a whole scheduler slice for its second thread (measured on 2 shared cores:
    16 ms per op instead of 0.5 ms, a 25x slower tracker), which a single thread never does."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, symmetries: SymmetrySet | Iterable[Symmetry],
                 run_dir: str | os.PathLike[str] | None = None, *, log_every: int = 10, log_spaced: bool = False,
                 flush_every: int = 200, config: Mapping[str, Any] | None = None,
                 paper_prefactor: str = "derived", rank: int | None = None):
        if log_every < 1 or flush_every < 1:
            raise TrackerError(f"log_every and flush_every must be >= 1 (got {log_every}, {flush_every})",
                               "pass positive integers")
        self.symmetries = symmetries if isinstance(symmetries, SymmetrySet) else SymmetrySet(symmetries)
        if len(self.symmetries) == 0:
            raise TrackerError("the symmetry set is empty, so there is nothing to track",
                               "pass nm.find_symmetries(model, example_inputs)")
        self.model = model
        self.optimizer = optimizer
        self.log_every = int(log_every)
        self.log_spaced = bool(log_spaced)
        self.flush_every = int(flush_every)
        self.step = 0
        """Number of optimizer steps seen so far (the index k of the next step)."""
        self.params = resolve_parameters(model, {m.param for s in self.symmetries for m in s.members})
        devices = {p.device for p in self.params.values()}
        if len(devices) != 1:
            raise TrackerError(f"tracked parameters live on several devices ({sorted(map(str, devices))})",
                               "the tracker supports models on one device (DDP replicas are fine)")
        self.device: torch.device = devices.pop()
        # members are validated (ranges, A1/A2 overlap) while compiling, without Symmetry.check's dense masks
        shapes = {n: p.shape for n, p in self.params.items()}
        self.exact_theory = type(optimizer) is torch.optim.SGD or (
            isinstance(optimizer, torch.optim.SGD) and type(optimizer).step is torch.optim.SGD.step)
        self.not_applicable = "" if self.exact_theory else (
            f"optimizer {type(optimizer).__name__} has no exact theory (its preconditioner breaks the laws); "
            "breaking_term holds the measured <D theta_k, u_k>, u_k = (theta_k - theta_{k+1}) / eta_k")
        quad = [s for s in self.symmetries if KINDS[s.kind].quadratic]
        lin = [s for s in self.symmetries if not KINDS[s.kind].quadratic]
        self.families = [f for f in (_Family(quad, True, shapes, self.device), _Family(lin, False, shapes, self.device))
                         if f.n]
        self.paper_prefactor = paper_prefactor
        self.invalid: dict[str, str] = {}
        self.writer: RunWriter | None = None
        self._pg_of: dict[int, int] = {}
        self._rebuild_pg_index()
        if rank is None:
            rank = (torch.distributed.get_rank()
                    if torch.distributed.is_available() and torch.distributed.is_initialized() else 0)
        self.rank = rank
        if run_dir is not None and rank == 0:
            self.writer = RunWriter(run_dir, config=config, hyperparameters=self._hyper_summary(),
                                    symmetries=self.symmetries, tracker=self._settings())
            if self.not_applicable:
                self.writer.manifest["not_applicable"] = self.not_applicable
            for name, reason in self.invalid.items():
                self.writer.mark_invalid(name, reason)
            self.writer.write_manifest()
        self._resumed = False
        self._prev: dict[str, Tensor] = {}
        self._log_now = False
        self._last_logged = -1
        self._hp_cache: tuple[Any, dict[int, Hyper]] | None = None
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                         optimizer.register_step_post_hook(self._post_hook)]
        self.closed = False

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {"log_every": self.log_every, "log_spaced": self.log_spaced, "flush_every": self.flush_every,
                "optimizer": type(self.optimizer).__name__, "exact_theory": self.exact_theory,
                "paper_prefactor": self.paper_prefactor,
                "memory_note": ("no parameter copies (SGD)" if self.exact_theory else
                                "one copy of every tracked parameter at log steps (optimizer term)")}

    def _hyper_summary(self) -> dict[str, Any]:
        groups = []
        for pg in self.optimizer.param_groups:
            d = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                 for k, v in pg.items() if k != "params"}
            d["n_params"] = len(pg["params"])
            groups.append(d)
        return {"optimizer": type(self.optimizer).__name__, "param_groups": groups}

    def _rebuild_pg_index(self) -> None:
        pg_of = {id(p): i for i, pg in enumerate(self.optimizer.param_groups) for p in pg["params"]}
        self._pg_of = pg_of
        for fam in self.families:
            first, sets = [], []
            for s in fam.syms:
                pgs = [pg_of.get(id(self.params[m.param])) for m in s.members]
                missing = [m.param for m, g in zip(s.members, pgs, strict=True) if g is None]
                if missing:
                    self._invalidate(fam, [fam.names.index(s.name)],
                                     f"member parameter {missing[0]!r} is not in the optimizer (never updated)")
                known = [g for g in pgs if g is not None]
                first.append(known[0] if known else 0)
                sets.append(tuple(sorted(set(known))))
            fam.pg_index = torch.tensor(first, dtype=torch.long, device=self.device)  # type: ignore[attr-defined]
            multi: dict[tuple[int, ...], list[int]] = {}
            for gid, st in enumerate(sets):
                if len(st) > 1:
                    multi.setdefault(st, []).append(gid)
            fam.multi_pg = multi  # type: ignore[attr-defined]
            # parameter -> group ids touching it (for "no gradient" invalidation)
            touch: dict[str, list[int]] = {}
            for gid, s in enumerate(fam.syms):
                for name in dict.fromkeys(m.param for m in s.members):
                    touch.setdefault(name, []).append(gid)
            fam.touch = touch  # type: ignore[attr-defined]
            fam.pgs = sorted({pg_of[id(self.params[n])] for n in fam.table.params if id(self.params[n]) in pg_of})

    def _invalidate(self, fam: _Family, gids: list[int], reason: str) -> None:
        new = [g for g in gids if fam.names[g] not in self.invalid]
        if not new:
            return
        fam.valid.index_fill_(0, torch.tensor(new, dtype=torch.long, device=self.device), False)
        for g in new:
            self.invalid[fam.names[g]] = reason
            if self.writer is not None:
                self.writer.mark_invalid(fam.names[g], reason)

    def _is_log_step(self, k: int) -> bool:
        return k % self.log_every == 0 or (self.log_spaced and _is_spaced(k))

    # ---- hyperparameters --------------------------------------------------------------------------
    def _pg_values(self) -> list[tuple[Any, ...]]:
        return [tuple(pg.get(k, False if k in ("nesterov", "maximize") else 0.0) for k in _HP_KEYS)
                for pg in self.optimizer.param_groups]

    def _hypers(self, values: list[tuple[Any, ...]]) -> dict[int, Hyper]:
        """Per family, Hyper [G] gathered from the param groups (cached while the values do not change)."""
        key = tuple(tuple(float(v) if not isinstance(v, Tensor) else id(v) for v in row) for row in values)
        if self._hp_cache is not None and self._hp_cache[0] == key:
            return self._hp_cache[1]
        out = {id(f): Hyper.from_param_groups(self.optimizer.param_groups, f.pg_index)  # type: ignore[attr-defined]
               for f in self.families}
        if not any(isinstance(v, Tensor) for row in values for v in row):
            self._hp_cache = (key, out)
        return out

    def _check_consistency(self, values: list[tuple[Any, ...]]) -> None:
        for fam in self.families:
            for st, gids in fam.multi_pg.items():  # type: ignore[attr-defined]
                rows = [values[i] for i in st]
                if any(r != rows[0] for r in rows[1:]):
                    diff = [k for j, k in enumerate(_HP_KEYS) if any(r[j] != rows[0][j] for r in rows)]
                    self._invalidate(fam, gids, f"members sit in param groups {list(st)} with different "
                                                f"{', '.join(diff)} at step {self.step}")

    # ---- measurement ------------------------------------------------------------------------------
    def _buffer(self, name: str) -> Tensor | None:
        buf = self.optimizer.state.get(self.params[name], {}).get("momentum_buffer")
        return buf if isinstance(buf, Tensor) else None

    def _mode(self, fam: _Family, values: list[tuple[Any, ...]]) -> str:
        """'heavy' when every param group of the family has momentum and no Nesterov, else 'general'."""
        rows = [values[i] for i in fam.pgs]
        heavy = bool(rows) and all(_num(r[1]) != 0 and not bool(_num(r[4])) for r in rows)
        return "heavy" if heavy else "general"

    def _sums(self, fam: _Family, need: list[str], signed: bool = True,
              unsigned: tuple[str, ...] = ()) -> dict[str, Tensor]:
        """Per group sum_{A_i} D_i x y for each named quantity, one cell pass per quantity and parameter.

        Names: two letters = a product of t (theta), g (gradient), b (momentum buffer as it is now), e.g.
        "tg" = <D theta, g>; "t1", "g1", "b1" = the plain sums <D, theta>, <D, g>, <D, b>; "a1" = <D, |theta|>.
        A missing gradient or buffer counts as 0. `unsigned` names are also summed with |D| ("<name>_abs").
        """
        if not need:
            return {}
        buffers = {n: self._buffer(n) for n in fam.table.params} if any("b" in q for q in need) else {}

        def factors(name: str) -> list[Factor]:
            p = self.params[name]
            th = p.detach()
            vec = {"t": th, "g": p.grad, "b": buffers.get(name)}
            out: list[Factor] = []
            for q in need:
                if q == "t1":
                    out.append(vec["t"])
                elif q == "a1":
                    out.append(th.abs())
                elif q == "g1":
                    out.append(vec["g"])
                elif q == "b1":
                    out.append(vec["b"])
                else:
                    x, y = vec[q[0]], vec[q[1]]
                    out.append(None if x is None or y is None else (x, y))
            return out

        cells = fam.table.cells(factors, len(need))
        sums = fam.table.segment_sum(cells, signed=signed)
        res = dict(zip(need, sums, strict=True))
        if unsigned:
            idx = [need.index(q) for q in unsigned]
            uns = fam.table.segment_sum(cells[idx], signed=False)
            res.update({q + "_abs": uns[i] for i, q in enumerate(unsigned)})
        return res

    def _quad_pre(self, fam: _Family, values: list[tuple[Any, ...]], measure: bool, log: bool) -> dict[str, Tensor]:
        """Quadratic family at the pre hook of step k: the products of (theta_k, g_k, b_{k-1}) this step needs.

        Always B = <D theta, g>. Heavy ball measures U = V = <b_k, D b_k> at the post hook instead (2 products
        per step in all); otherwise (plain SGD, Nesterov, mixed) gg = <g, D g> and, with momentum,
        gb = <g, D b_{k-1}> (3 products), and the rest follows from the recurrences' own state (`_derived`).
        At log steps (and the first step) also tt = <theta, D theta> (and |theta_A|^2, |g_A|^2 unsigned).
        """
        first = fam.exact is None
        heavy = fam.mode == "heavy" and self.exact_theory
        # gb is needed with momentum, and in momentum-0 steps once buffers exist (they move P = <D theta, b_old>)
        momentum = any(_num(values[i][1]) != 0 for i in fam.pgs) or any(
            self._buffer(n) is not None for n in fam.table.params)
        need = ["tg"] if self.exact_theory else []
        if log or (self.exact_theory and not heavy):
            need.append("gg")
        if measure:
            need.append("tt")
        if self.exact_theory and not heavy and momentum:
            need.append("gb")
        if first:
            need.append("tb")
        if first or (self.exact_theory and not heavy and momentum and fam.vel is None):
            need.append("bb")
        out = self._sums(fam, need, unsigned=tuple(q for q in ("tt", "gg") if log and q in need))
        res = {"B": out["tg"]} if "tg" in out else {}
        if "tt" in out:
            res["C"] = out["tt"]
        if log:
            res["norm2"], res["gnorm2"] = out["tt_abs"], out["gg_abs"]
        if "tb" in out:
            res["overlap"] = out["tb"]
        if "bb" in out and (fam.vel is None or first):
            fam.vel = out["bb"]
        for q in ("gg", "gb"):
            if q in out:
                res[q] = out[q]
        return res

    def _derived(self, fam: _Family, hp: Hyper, inp: dict[str, Tensor]) -> None:
        """U, V, grad_sq, velocity_sq from gg, gb, B and the breaking recurrence's C_k, P_k and carried bb:

            s = -1 under maximize else 1;  dd = <d, D d> = gg + 2 lambda s B + lambda^2 C
            e = <d, D b_{k-1}> = s gb + lambda P;   db = <d, D b_k> = beta e + (1 - tau) dd  (dd before any buffer)
            bb = <b_k, D b_k> = beta^2 bb_{k-1} + 2 beta (1 - tau) e + (1 - tau)^2 dd  (dd before any buffer)
            U = dd | bb | dd + 2 beta db + beta^2 bb,   V = dd | bb | db + beta bb   (plain | heavy ball | Nesterov)
            (momentum 0 with an old buffer b_old: V = <d, D b_old> = e, which moves P; U = dd; bb stays)

        (C_k and P_k = <D theta_k, b_{k-1}> of the breaking recurrence equal the measured ones to rounding, and
        they only enter multiplied by lambda, so U and V are the measured ones to rounding.)
        """
        rec = fam.breaking
        C, P, started = rec.charge, rec.overlap, rec.started
        r = hp.resolved(C)
        beta, tau, lam = r.momentum, r.dampening, r.weight_decay
        s = torch.where(r.maximize, -1.0, 1.0).to(C.dtype)
        dd = inp["gg"] + 2 * lam * s * inp["B"] + lam * lam * C
        zero = torch.zeros_like(C)
        e = s * inp.get("gb", zero) + lam * P
        vel = fam.vel if fam.vel is not None else zero
        db = torch.where(started, beta * e + (1 - tau) * dd, dd)
        bb = torch.where(started, beta * beta * vel + 2 * beta * (1 - tau) * e + (1 - tau) ** 2 * dd, dd)
        buffered = beta != 0
        nest = r.nesterov & buffered
        inp["U"] = torch.where(buffered, torch.where(nest, dd + 2 * beta * db + beta * beta * bb, bb), dd)
        inp["V"] = torch.where(buffered, torch.where(nest, db + beta * bb, bb), torch.where(started, e, dd))
        inp["grad_sq"], inp["velocity_sq"] = inp["gg"], torch.where(buffered, bb, dd)
        fam.vel = torch.where(buffered, bb, vel)

    def _lin_pre(self, fam: _Family, measure: bool, log: bool) -> dict[str, Tensor]:
        """Linear family: B = <1_A, g> every step (+ T, sum |theta|, |g|^2 at log steps; <1_A, b_{-1}> at the first)."""
        need = ["g1"] if self.exact_theory else []
        if measure:
            need.append("t1")
        if log:
            need += ["a1", "gg"]
        if fam.exact is None:
            need.append("b1")
        out = self._sums(fam, need)
        res = {"B": out["g1"]} if "g1" in out else {}
        if measure:
            res["C"] = out["t1"]
        if log:
            res["norm2"], res["gnorm2"] = out["a1"], out["gg"]
        if "b1" in out:
            res["overlap"] = out["b1"]
        return res

    def _start(self, fam: _Family, inp: dict[str, Tensor]) -> None:
        """Build the recurrences at the first step from the measured charge (and existing momentum buffers)."""
        C0 = inp["C"]
        started = torch.tensor([self._buffer(s.members[0].param) is not None for s in fam.syms],
                               dtype=torch.bool, device=self.device)
        overlap0 = inp["overlap"] if bool(started.any()) else None
        cls = QuadraticRecurrence if fam.quadratic else LinearRecurrence
        fam.exact = cls(C0, overlap0=overlap0)
        fam.breaking = cls(C0, overlap0=overlap0)
        for rec in (fam.exact, fam.breaking):
            rec.started = started.clone()
        fam.paper = PaperPrediction(fam.quadratic, C0, prefactor=self.paper_prefactor)  # type: ignore[arg-type]

    # ---- hooks ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Run the block with `hook_threads` torch threads on CPU (see there), restoring the setting after."""
        n = torch.get_num_threads()
        want = self.hook_threads
        if self.device.type != "cpu" or want is None or want >= n:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    def _pre_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        """Measure theta_k and g_k before the update.

        With `optimizer.step(closure)` the gradients do not exist yet when this hook runs: the closure computes
        them inside `step`. The hook then hands `step` a wrapped closure (step pre-hooks may return new
        (args, kwargs)) that measures right after the first evaluation, at theta_k - the same moment as
        backward-then-step. Later evaluations (line searches) are not measured.
        """
        # torch passes the bound call's positional args, optimizer first: (optimizer, closure?)
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if len(args) > 1 else None)
        if closure is None:
            with self._threads(), torch.no_grad():
                self._pre(optimizer)
            return None
        measured = False

        def measuring_closure() -> Any:
            nonlocal measured
            loss = closure()
            if not measured:
                measured = True
                with self._threads(), torch.no_grad():
                    self._pre(optimizer)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": measuring_closure}
        return (args[0], measuring_closure, *args[2:]), kwargs

    def _post_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with self._threads(), torch.no_grad():
            self._post(optimizer)

    def _pre(self, optimizer: torch.optim.Optimizer) -> None:
        k = self.step
        log = self._is_log_step(k) and self.writer is not None
        values = self._pg_values()
        # validity: parameters without gradient, hyperparameters that differ inside a group
        for fam in self.families:
            for name, gids in fam.touch.items():  # type: ignore[attr-defined]
                if self.params[name].grad is None:
                    self._invalidate(fam, gids, f"member parameter {name!r} got no gradient at step {k}")
        self._check_consistency(values)
        hps = self._hypers(values)
        self._prev = ({name: p.detach().clone() for name, p in self.params.items()}
                      if not self.exact_theory and log else {})
        for fam in self.families:
            hp = hps[id(fam)]
            fam.hp, fam.mode = hp, self._mode(fam, values)
            measure = log or fam.exact is None
            inp = self._quad_pre(fam, values, measure, log) if fam.quadratic else self._lin_pre(fam, measure, log)
            if fam.exact is None:
                self._start(fam, inp)
            heavy = fam.quadratic and fam.mode == "heavy"
            if fam.quadratic and self.exact_theory and not heavy:
                self._derived(fam, hp, inp)
            fam.pending = self._row_tensors(fam, inp, hp) if log else None
            fam.B = inp.get("B")
            if not self.exact_theory:
                continue
            if not fam.quadratic:
                fam.exact.step(hp)
                fam.breaking.step(hp, inp["B"])
                fam.paper.step(hp)
            elif not heavy:
                self._advance(fam, inp)
        self._log_now = log

    def _advance(self, fam: _Family, inp: Mapping[str, Tensor]) -> None:
        """Step the three quadratic predictions k -> k+1 with this step's U, V, B (and grad_sq, velocity_sq)."""
        hp = fam.hp
        assert hp is not None
        fam.exact.step(hp, inp["U"], inp["V"])
        fam.breaking.step(hp, inp["U"], inp["V"], inp["B"])
        fam.paper.step(hp, inp.get("grad_sq"), inp.get("velocity_sq"))

    def _post(self, optimizer: torch.optim.Optimizer) -> None:
        k = self.step
        if not self.exact_theory:
            if self._log_now:
                self._optimizer_term()
        else:
            for fam in self.families:
                if fam.quadratic and fam.mode == "heavy":
                    self._heavy_post(fam)
        if self._log_now:
            self._emit(k)
        self._log_now = False
        self._prev = {}
        self.step = k + 1
        if self.writer is not None and self.step % self.flush_every == 0:
            self.writer.flush()

    def _heavy_post(self, fam: _Family) -> None:
        """Heavy ball, after torch's step: U_k = V_k = velocity_sq = <b_k, D b_k> from the updated buffers."""
        assert fam.B is not None and fam.hp is not None
        bb = self._sums(fam, ["bb"])["bb"]
        fam.vel = bb
        self._advance(fam, {"U": bb, "V": bb, "B": fam.B, "velocity_sq": bb})
        if fam.pending is not None:
            self._angular(fam, fam.pending, bb, fam.hp)

    def _angular(self, fam: _Family, row: dict[str, Tensor], U: Tensor, hp: Hyper) -> None:
        """Scale groups: |theta_{k+1} - theta_k| / |theta_k| = eta sqrt(U / C) (D = +1, so U = |u_A|^2)."""
        lr = torch.as_tensor(hp.lr, dtype=torch.float64, device=self.device).expand(fam.n)
        ang = lr * torch.sqrt(U / row["measured"].abs().clamp_min(_TINY))
        row["angular_update"] = torch.where(fam.is_scale, ang, torch.nan)

    def _optimizer_term(self) -> None:
        """Other optimizers, at log steps: per group <D theta_k, u_k> with u_k = (theta_k - theta_{k+1}) / eta_k."""
        hps = self._hypers(self._pg_values())
        prev = self._prev
        for fam in self.families:
            if fam.pending is None:
                continue
            delta = {name: prev[name] - self.params[name].detach() for name in fam.table.params}

            def factors(name: str, fam: _Family = fam, delta: dict[str, Tensor] = delta) -> list[Factor]:
                if fam.quadratic:
                    return [(prev[name], delta[name]), (delta[name], delta[name])]
                return [delta[name], None]

            cells = fam.table.cells(factors, 2)
            lr = torch.as_tensor(hps[id(fam)].lr, dtype=torch.float64, device=self.device)
            eta = torch.where(lr != 0, lr, torch.full_like(lr, float("nan")))
            term = fam.table.segment_sum(cells[:1])[0] / eta
            fam.pending["breaking_term"] = term
            if fam.quadratic:
                d2 = fam.table.segment_sum(cells[1:], signed=False)[0]
                ang = torch.sqrt(d2 / fam.pending["measured"].abs().clamp_min(_TINY))
                fam.pending["angular_update"] = torch.where(fam.is_scale, ang, torch.nan)

    # ---- rows -------------------------------------------------------------------------------------
    def _row_tensors(self, fam: _Family, inp: dict[str, Tensor], hp: Hyper | None) -> dict[str, Tensor]:
        nan = torch.full((fam.n,), float("nan"), dtype=torch.float64, device=self.device)
        C = inp["C"]
        valid = fam.valid & torch.tensor(self.exact_theory, device=self.device)
        pe = torch.where(valid, fam.exact.charge, nan)
        pb = torch.where(valid, fam.breaking.charge, nan)
        pp = torch.where(valid, fam.paper.charge, nan)
        norm = torch.where(fam.is_rescale, inp["norm2"], C.abs()) if fam.quadratic else inp["norm2"]
        lr = nan if hp is None else torch.as_tensor(hp.lr, dtype=torch.float64, device=self.device).expand(fam.n)
        row = {"measured": C, "predicted_exact": pe, "predicted_breaking": pb, "predicted_paper": pp,
               "breaking": pb - pe, "breaking_term": inp["B"] if self.exact_theory else nan, "lr": lr,
               "norm": norm, "grad_norm": torch.sqrt(inp["gnorm2"]) if "gnorm2" in inp else nan,
               "angular_update": nan, "valid": valid.to(torch.float64)}
        if fam.quadratic and self.exact_theory and "U" in inp and hp is not None:
            self._angular(fam, row, inp["U"], hp)
        return row

    def _emit(self, step: int) -> None:
        """Move the pending rows of every family to the host (one transfer) and buffer them for the writer."""
        if self.writer is None:
            for fam in self.families:
                fam.pending = None
            return
        frames = []
        for fam in self.families:
            if fam.pending is None:
                continue
            cols = list(fam.pending)
            block = torch.stack([fam.pending[c] for c in cols]).cpu().numpy()
            data: dict[str, Any] = {c: block[i] for i, c in enumerate(cols)}
            data["valid"] = data["valid"] > 0.5
            fam.norm_max = np.fmax(fam.norm_max, np.abs(data["norm"]))
            data["norm_max"] = fam.norm_max.copy()
            df = pd.DataFrame({"step": np.full(fam.n, step, dtype=np.int64), "group": fam.names, "kind": fam.kinds,
                               "layer": fam.layers, **data})
            frames.append(df)
            fam.pending = None
        if not frames:
            return
        df = pd.concat(frames, ignore_index=True)
        self.writer.append("groups", {c: df[c].to_numpy() for c in df.columns if c != "norm_max"})
        self.writer.append("layers", _layer_rows(df))
        self._last_logged = step

    # ---- public API -------------------------------------------------------------------------------
    def log_metrics(self, step: int, split: str = "train", **values: float | Tensor) -> None:
        """Append training-loop metrics (step, split, name, value) to the run's metrics table."""
        if self.writer is None or not values:
            return
        names = list(values)
        vals = [float(v.item()) if isinstance(v, Tensor) else float(v) for v in values.values()]
        self.writer.append("metrics", {"step": [int(step)] * len(names), "split": [split] * len(names),
                                       "name": names, "value": vals})

    def flush(self) -> None:
        """Write buffered rows to new part files now (atomic; cheap to call)."""
        if self.writer is not None:
            self.writer.flush()

    @torch.no_grad()
    def log_now(self) -> None:
        """Log the current state (theta at step `self.step`, predictions for it) outside a step."""
        if self.writer is None or any(f.exact is None for f in self.families):
            return
        values = self._pg_values()
        hps = self._hypers(values)
        for fam in self.families:
            inp = self._quad_pre(fam, values, True, True) if fam.quadratic else self._lin_pre(fam, True, True)
            row = self._row_tensors(fam, inp, hps[id(fam)])
            nan = torch.full((fam.n,), float("nan"), dtype=torch.float64, device=self.device)
            row["grad_norm"], row["breaking_term"], row["angular_update"] = nan, nan, nan
            fam.pending = row
        self._emit(self.step)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (tensors, lists, dicts, str, numbers: loads with weights_only=True).

        Flushes buffered rows first, so the run directory holds every row up to this checkpoint.
        """
        self.flush()
        fams = []
        for fam in self.families:
            fams.append({
                "names": list(fam.names),
                "valid": fam.valid.cpu().clone(),
                "exact": None if fam.exact is None else _to_cpu(fam.exact.state_dict()),
                "breaking": None if fam.breaking is None else _to_cpu(fam.breaking.state_dict()),
                "paper": None if fam.paper is None else _to_cpu(fam.paper.state_dict()),
                "vel": None if fam.vel is None else fam.vel.detach().cpu().clone(),
                "norm_max": torch.from_numpy(fam.norm_max.copy()),
            })
        return {"version": STATE_VERSION, "step": self.step, "families": fams, "invalid": dict(self.invalid),
                "exact_theory": self.exact_theory}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`: restores the step, predictions and validity; truncates the run_dir there."""
        if int(state.get("version", -1)) != STATE_VERSION:
            raise TrackerError(f"tracker state has version {state.get('version')}, expected {STATE_VERSION}",
                               "resume with the neural-mechanics version that wrote the checkpoint")
        fams = state["families"]
        if [f["names"] for f in fams] != [f.names for f in self.families]:
            raise TrackerError("the tracker state was saved for a different symmetry set",
                               "build the Tracker with the symmetries of the checkpointed run (manifest.json)")
        self.step = int(state["step"])
        for fam, fs in zip(self.families, fams, strict=True):
            fam.valid = fs["valid"].to(self.device).clone()
            vel = fs.get("vel")
            fam.vel = None if vel is None else vel.to(device=self.device, dtype=torch.float64).clone()
            if fs.get("norm_max") is not None:
                fam.norm_max = fs["norm_max"].numpy().astype(np.float64).copy()
            if fs["exact"] is None:
                fam.exact = fam.breaking = fam.paper = None
                continue
            dummy = torch.zeros(fam.n, dtype=torch.float64, device=self.device)
            cls = QuadraticRecurrence if fam.quadratic else LinearRecurrence
            fam.exact, fam.breaking = cls(dummy), cls(dummy)
            fam.paper = PaperPrediction(fam.quadratic, dummy, prefactor=self.paper_prefactor)  # type: ignore[arg-type]
            fam.exact.load_state_dict(fs["exact"])
            fam.breaking.load_state_dict(fs["breaking"])
            fam.paper.load_state_dict(fs["paper"])
        self.invalid = dict(state.get("invalid", {}))
        if self.writer is not None:
            dropped = self.writer.truncate_from(self.step)
            self.writer.manifest["invalid"] = dict(self.invalid)
            self.writer.add_note(f"resumed at step {self.step} (dropped {dropped} stored rows from step "
                                 f"{self.step} on)")
            self.writer.write_manifest()
        self._resumed = True

    def close(self, status: str = "finished", note: str | None = None) -> None:
        """Detach the hooks, log the final state if it is a log step, flush, and mark the run's status."""
        if self.closed:
            return
        self.closed = True
        for h in self._handles:
            h.remove()
        if status == "finished" and self._is_log_step(self.step) and self._last_logged != self.step:
            try:
                self.log_now()
            except Exception as e:  # never lose the run over the final row
                warnings.warn(f"could not log the final step: {e}", RuntimeWarning, stacklevel=2)
        if self.writer is not None:
            self.writer.flush()
            self.writer.set_status(status, note)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close("finished")
        else:
            self.close("failed", f"{exc_type.__name__}: {exc} at step {self.step}")

    def frame(self) -> pd.DataFrame:
        """The rows written so far (flushes first); requires a run_dir."""
        if self.writer is None:
            raise TrackerError("this tracker has no run_dir (or is not rank 0)", "pass run_dir to the Tracker")
        from neural_mechanics.tracking.store import open_run

        self.flush()
        return open_run(self.writer.dir).frame()


def _num(v: Any) -> float:
    return float(v.item()) if isinstance(v, Tensor) else float(v)


def _to_cpu(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu().clone() if isinstance(v, Tensor) else v) for k, v in d.items()}


RELATIVE_ERROR_FLOOR = 1e-6
"""Relative errors divide by max(norm_k, RELATIVE_ERROR_FLOOR * max_{j <= k} norm_j) (j over the group's logged steps).

`norm` is the tracker's column (|C| for scale, |theta_A1|^2 + |theta_A2|^2 for rescale, sum |theta| for translation).
A group whose charge decays to nothing (a dead ReLU channel under weight decay reaches 1e-25) would otherwise
report float rounding of its earlier, larger values as a "relative" error of 1e5..1e10; with the floor its
prediction is still compared absolutely, against a millionth of its own largest size so far. The layers frame,
`relative_errors` (the report and `max_relative_errors` should use it) and this constant are the one definition.
"""

PREDICTION_COLUMNS = ("predicted_exact", "predicted_breaking", "predicted_paper")


def error_denominator(norm: np.ndarray, norm_max: np.ndarray) -> np.ndarray:
    """max(|norm|, RELATIVE_ERROR_FLOOR * norm_max, 1e-30), elementwise (norm_max = largest |norm| so far)."""
    return np.maximum(np.maximum(np.abs(norm), RELATIVE_ERROR_FLOOR * np.abs(norm_max)), _TINY)


def relative_errors(frame: pd.DataFrame, columns: tuple[str, ...] = PREDICTION_COLUMNS) -> pd.DataFrame:
    """A copy of a groups frame with err_<name> = |p - measured| / error_denominator(norm, running max of norm).

    The running max is taken per group over its rows in step order, as the tracker does while logging, so the
    err_* of this function equal those behind the layers frame.
    """
    df = frame.copy()
    norm = df["norm"].abs().astype(np.float64)
    order = df.sort_values("step", kind="stable").index
    running = norm.loc[order].groupby(df.loc[order, "group"]).cummax().reindex(df.index)
    den = error_denominator(norm.to_numpy(), running.to_numpy())
    meas = df["measured"].to_numpy()
    for col in columns:
        if col in df.columns:
            with np.errstate(invalid="ignore"):
                df["err_" + col.removeprefix("predicted_")] = np.abs(df[col].to_numpy() - meas) / den
    return df


def _layer_rows(df: pd.DataFrame) -> dict[str, Any]:
    """Per (layer, kind) aggregates of one logged step (host side, O(G)); df carries the running `norm_max`."""
    den = error_denominator(df["norm"].to_numpy(), df["norm_max"].to_numpy())
    meas = df["measured"].to_numpy()
    with np.errstate(invalid="ignore"):
        df = df.assign(**{"err_" + c.removeprefix("predicted_"): np.abs(df[c].to_numpy() - meas) / den
                          for c in PREDICTION_COLUMNS})
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = df["lr"].to_numpy() / df["measured"].to_numpy()
        df = df.assign(eff_lr=np.where(df["kind"].to_numpy() == "scale", eff, np.nan))
    out: dict[str, list[Any]] = {c: [] for c in (
        "step", "layer", "kind", "n_groups", "n_valid", "mean_charge", "err_exact_max", "err_exact_median",
        "err_breaking_max", "err_breaking_median", "err_paper_max", "err_paper_median", "grad_norm",
        "angular_update_median", "effective_lr_median", "lr")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for (layer, kind), g in df.groupby(["layer", "kind"], sort=False):
            v = g[g["valid"]]
            out["step"].append(int(g["step"].iloc[0]))
            out["layer"].append(layer)
            out["kind"].append(kind)
            out["n_groups"].append(len(g))
            out["n_valid"].append(len(v))
            out["mean_charge"].append(float(g["measured"].mean()))
            for name in ("exact", "breaking", "paper"):
                e = v[f"err_{name}"].to_numpy()
                out[f"err_{name}_max"].append(float(np.nanmax(e)) if len(e) else math.nan)
                out[f"err_{name}_median"].append(float(np.nanmedian(e)) if len(e) else math.nan)
            out["grad_norm"].append(float(np.sqrt(np.nansum(g["grad_norm"].to_numpy() ** 2)))
                                    if g["grad_norm"].notna().any() else math.nan)
            out["angular_update_median"].append(float(np.nanmedian(g["angular_update"].to_numpy()))
                                                if kind == "scale" else math.nan)
            out["effective_lr_median"].append(float(np.nanmedian(g["eff_lr"].to_numpy())) if kind == "scale"
                                              else math.nan)
            out["lr"].append(float(np.nanmedian(g["lr"].to_numpy())))
    return out
