"""Brute-force reference tracker: dense masks, explicit update vectors, scalar recurrences per group.

This is the slow, obviously-correct twin of `Tracker`, a test oracle (kept in tests/, not in the package). At
every step it copies all parameters, builds the update u_k of torch.optim.SGD explicitly (in float64,
docs/theory.md section 5)

    d = g + lambda theta (g -> -g under maximize),  b = d (first buffered step) | beta b_prev + (1 - tau) d,
    u = d | b | d + beta b,

takes every per-group quantity straight from `Symmetry.masks()` (D), and advances the exact recurrence with
Python floats, one group at a time, written independently of `theory.exact` (and, for scale groups, the angle
between theta_k and theta_{k+1} from the two vectors):

    X = lambda C + B;  Q = X (first) | beta P + (1 - tau) X;  <D theta, u> = X | Q | X + beta Q
    C_{k+1} = C - 2 eta <D theta, u> + eta^2 U;  P_{k+1} = Q - eta V       (quadratic)
    (momentum 0 after momentum steps: torch keeps the old buffer b_old, V = <D u, b_old>, P_{k+1} = P - eta V)
    X = lambda T + B;  M = X (first) | beta M + (1 - tau) X;  T_{k+1} = T - eta (X | M | X + beta M)   (linear)

It needs two full parameter copies and one dense mask per (group, parameter): use it on small models.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from neural_mechanics.symmetry.groups import Symmetry
from neural_mechanics.symmetry.kinds import KINDS
from neural_mechanics.tracking.parameters import resolve_parameters


class ReferenceTracker:
    """Records, per step k, measured charges and inputs and the exact predictions (B = 0 and measured B)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.SGD, symmetries: Iterable[Symmetry]):
        self.syms = list(symmetries)
        self.optimizer = optimizer
        self.params = resolve_parameters(model, {m.param for s in self.syms for m in s.members})
        self.pg_of = {id(p): i for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}
        detached = {n: p.detach() for n, p in self.params.items()}
        self.masks = [{k: d.to(torch.float64) for k, d in s.masks(detached).items()} for s in self.syms]
        self.buffers: dict[str, Tensor] = {}
        self.state: list[dict[str, Any]] | None = None
        self.history: list[dict[str, Any]] = []
        """One dict per step k: measured C_k / predictions for k (before the step), inputs of step k."""
        self.step = 0
        self._handle = optimizer.register_step_pre_hook(self._pre)

    def close(self) -> None:
        self._handle.remove()

    def _update_vectors(self) -> dict[str, dict[str, Tensor]]:
        out = {}
        for name, p in self.params.items():
            pg = self.optimizer.param_groups[self.pg_of[id(p)]]
            beta, tau, lam = pg["momentum"], pg["dampening"], pg["weight_decay"]
            theta = p.detach().to(torch.float64).clone()
            assert p.grad is not None, f"{name} has no gradient (the reference needs every tracked gradient)"
            g = p.grad.detach().to(torch.float64).clone()
            g_eff = -g if pg.get("maximize", False) else g
            d = g_eff + lam * theta
            prev = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if beta != 0:
                b = d.clone() if prev is None else beta * prev.to(torch.float64) + (1 - tau) * d
                u = d + beta * b if pg["nesterov"] else b
            else:  # torch leaves an existing buffer untouched; V = <D u, b_old> moves P = <D theta, b_old>
                b = d.clone() if prev is None else prev.to(torch.float64).clone()
                u = d
            out[name] = {"theta": theta, "g": g, "d": d, "b": b, "u": u}
        return out

    @torch.no_grad()
    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        vec = self._update_vectors()
        rec: dict[str, Any] = {"step": self.step}
        if self.state is None:
            self.state = []
            for s, masks in zip(self.syms, self.masks, strict=True):
                c0 = self._charge(s, masks, vec)
                self.state.append({"exact": c0, "breaking": c0, "P_e": 0.0, "P_b": 0.0, "started": False})
        for key in ("measured", "exact", "breaking", "U", "V", "B", "grad_sq", "velocity_sq", "angle"):
            rec[key] = {}
        for s, masks, st in zip(self.syms, self.masks, self.state, strict=True):
            quad = KINDS[s.kind].quadratic
            C = self._charge(s, masks, vec)
            first = next(iter(masks))
            pg = self.optimizer.param_groups[self.pg_of[id(self.params[first])]]
            eta, beta, tau, lam, nest = pg["lr"], pg["momentum"], pg["dampening"], pg["weight_decay"], pg["nesterov"]
            sgn = -1.0 if pg.get("maximize", False) else 1.0
            if quad:
                B = sum(float((masks[k] * vec[k]["theta"] * vec[k]["g"]).sum()) for k in masks)
                U = sum(float((masks[k] * vec[k]["u"] * vec[k]["u"]).sum()) for k in masks)
                V = sum(float((masks[k] * vec[k]["u"] * vec[k]["b"]).sum()) for k in masks)
                gsq = sum(float((masks[k] * vec[k]["g"] * vec[k]["g"]).sum()) for k in masks)
                vsq = sum(float((masks[k] * vec[k]["b"] * vec[k]["b"]).sum()) for k in masks)
            else:
                B = sum(float((masks[k] * vec[k]["g"]).sum()) for k in masks)
                U = V = gsq = vsq = float("nan")
            rec["measured"][s.name], rec["exact"][s.name], rec["breaking"][s.name] = C, st["exact"], st["breaking"]
            rec["U"][s.name], rec["V"][s.name], rec["B"][s.name] = U, V, B
            rec["grad_sq"][s.name], rec["velocity_sq"][s.name] = gsq, vsq
            if s.kind == "scale":  # the angle between theta_k and theta_{k+1} = theta_k - eta u_k, from the vectors
                w0 = torch.cat([(masks[k] * vec[k]["theta"]).reshape(-1) for k in masks])
                w1 = torch.cat([(masks[k] * (vec[k]["theta"] - eta * vec[k]["u"])).reshape(-1) for k in masks])
                along = float(w1 @ w0) / float(w0.norm())
                rec["angle"][s.name] = math.atan2(float((w1 - along * w0 / w0.norm()).norm()), along)
            for which, b_term in (("exact", 0.0), ("breaking", sgn * B)):
                c = st[which]
                X = lam * c + b_term
                Q = beta * st["P_" + which[0]] + (1 - tau) * X if st["started"] else X
                du = X if beta == 0 else X + beta * Q if nest else Q
                if quad:
                    st[which] = c - 2 * eta * du + eta * eta * U
                    if beta != 0:
                        st["P_" + which[0]] = Q - eta * V
                    elif st["started"]:
                        st["P_" + which[0]] = st["P_" + which[0]] - eta * V
                else:
                    st[which] = c - eta * du
                    if beta != 0:
                        st["P_" + which[0]] = Q
            if beta != 0:
                st["started"] = True
        self.history.append(rec)
        self.step += 1

    @staticmethod
    def _charge(s: Symmetry, masks: dict[str, Tensor], vec: dict[str, dict[str, Tensor]]) -> float:
        if KINDS[s.kind].quadratic:
            return sum(float((masks[k] * vec[k]["theta"] ** 2).sum()) for k in masks)
        return sum(float((masks[k] * vec[k]["theta"]).sum()) for k in masks)

    def final_charges(self) -> dict[str, float]:
        """Measured charges at the current parameters (after the last step)."""
        out = {}
        for s, masks in zip(self.syms, self.masks, strict=True):
            theta = {k: self.params[k].detach().to(torch.float64) for k in masks}
            if KINDS[s.kind].quadratic:
                out[s.name] = sum(float((masks[k] * theta[k] ** 2).sum()) for k in masks)
            else:
                out[s.name] = sum(float((masks[k] * theta[k]).sum()) for k in masks)
        return out
