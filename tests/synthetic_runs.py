"""A synthetic run with the run store's schema, for the plot and report tests (a test fixture, not shipped).

Each symmetry group is simulated on its own as a small parameter vector theta_A updated by
torch.optim.SGD's rule (momentum beta, dampening tau, coupled weight decay lambda, optional
Nesterov, a step-decay lr schedule) in float32, with a random minibatch gradient that obeys the
group's gradient constraint <D theta, g> = 0 up to a small, deliberate breaking term (like
BatchNorm's eps). From that it records what the tracker records:

- measured charge C_k = <theta_k, D theta_k> (T_k = <theta_k, 1_A> for translation), in float64;
- predicted_exact: docs/theory.md section 5 recurrence with the measured U_k, V_k and B_k = 0;
- predicted_breaking: the same recurrence with the measured breaking B_k = <D theta_k, g_k> carried;
- predicted_paper: the continuous model of section 3 (SGD: exponential decay plus the eta |g|^2
  integral; momentum: the damped oscillator S'' + 2 gamma S' + omega^2 S = 2 |theta'|^2 stepped with
  dt = h), which differs from the measured charge by O(eta lambda) as in the paper.

The "network" is a fixed list of layers resembling a small BN conv net with an MLP head. Nothing
here is used by the tracker; it only gives the plotters data of the right shape and texture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from neural_mechanics.tracking.metrics import EQUILIBRIUM_COLUMNS, LAYER_AGGREGATES

DEFAULT_LAYERS: tuple[tuple[str, str, int, int], ...] = (
    # (layer, kind, number of groups, coordinates per group)
    ("features.0", "scale", 8, 28),
    ("features.1", "rescale", 8, 2 + 72),
    ("features.3", "scale", 16, 73),
    ("features.4", "rescale", 16, 2 + 144),
    ("features.7", "scale", 16, 145),
    ("classifier.0", "rescale", 24, 17 + 10),
    ("classifier.2", "translation", 25, 10),
)


@dataclass
class SyntheticRun:
    """A live run object with the plotters' interface: .frame(), .layers(), .metrics(), .manifest, .symmetries."""

    groups: pd.DataFrame
    layer_frame: pd.DataFrame
    metric_frame: pd.DataFrame
    manifest: dict[str, Any]
    symmetries: list[dict[str, Any]]
    param_trace: pd.DataFrame = field(default_factory=pd.DataFrame)
    constraints: pd.DataFrame = field(default_factory=pd.DataFrame)

    def frame(self) -> pd.DataFrame:
        return self.groups

    def layers(self) -> pd.DataFrame:
        return self.layer_frame

    def metrics(self) -> pd.DataFrame:
        return self.metric_frame


def _lr_at(k: int, lr: float, steps: int) -> float:
    """Step decay: lr until 60% of the run, lr / 10 after."""
    return lr if k < int(0.6 * steps) else lr / 10


def synthetic_run(steps: int = 300, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 5e-3,
                  dampening: float = 0.0, nesterov: bool = False, breaking: float = 1e-3, seed: int = 0,
                  layers: tuple[tuple[str, str, int, int], ...] = DEFAULT_LAYERS, log_every: int = 1,
                  trace_params: int = 6) -> SyntheticRun:
    """Simulate every group of `layers` for `steps` SGD steps and return the frames (see module docstring)."""
    rng = np.random.default_rng(seed)
    beta, tau, lam = float(momentum), float(dampening), float(weight_decay)
    lrs = np.array([_lr_at(k, lr, steps) for k in range(steps)])
    logged = np.arange(0, steps + 1, log_every)
    rows: list[pd.DataFrame] = []
    layer_rows: list[dict[str, Any]] = []
    trace_rows: list[pd.DataFrame] = []
    symmetries: list[dict[str, Any]] = []
    for depth, (layer, kind, n_groups, dim) in enumerate(layers):
        sign = np.ones(dim, dtype=np.float32)
        if kind == "rescale":
            n_in = 2 if layer.startswith("features") else dim - 10  # BN (gamma, beta) | Linear row + bias
            sign[n_in:] = -1.0
        # theta: (groups, dim); gradient noise amplitude shrinks with depth and with training
        theta = (rng.standard_normal((n_groups, dim)) * (0.8 / np.sqrt(dim)) * (1.0 + 0.4 * rng.random((n_groups, 1))))
        theta = theta.astype(np.float32)
        if kind == "translation":
            theta += np.float32(0.05) * rng.standard_normal((n_groups, 1)).astype(np.float32)
        sigma = 0.6 * (1.0 + 0.3 * depth / len(layers)) * (0.7 + 0.6 * rng.random((n_groups, 1)))
        buf = np.zeros_like(theta)
        quad = kind != "translation"
        charge = np.zeros((steps + 1, n_groups))
        exact = np.zeros_like(charge)
        brk = np.zeros_like(charge)
        paper = np.zeros_like(charge)
        bterm = np.zeros_like(charge)
        norm = np.zeros_like(charge)
        gsq = np.zeros((steps, n_groups))
        upd = np.zeros((steps, n_groups))
        # recurrence state (per group, float64): exact and breaking-carrying
        st: dict[str, dict[str, np.ndarray]] = {k: {"C": np.zeros(n_groups), "P": np.zeros(n_groups),
                                                    "Q": np.zeros(n_groups)} for k in ("exact", "brk")}
        # paper state: value and time derivative
        p_val, p_dot = np.zeros(n_groups), np.zeros(n_groups)
        trace_idx = rng.choice(dim, size=min(trace_params, dim), replace=False)
        for k in range(steps + 1):
            th64 = theta.astype(np.float64)
            c = (th64 * th64 * sign).sum(1) if quad else th64.sum(1)
            charge[k] = c
            norm[k] = np.abs(c) if kind == "scale" else (th64 * th64).sum(1) if quad else np.abs(th64).sum(1)
            if k == 0:
                for s in st.values():
                    s["C"] = c.copy()
                p_val = c.copy()
            exact[k], brk[k], paper[k] = st["exact"]["C"], st["brk"]["C"], p_val
            if kind == "scale" and k % max(1, steps // 60) == 0:
                trace_rows.append(pd.DataFrame({
                    "step": k, "layer": layer, "param": [f"{layer}.weight[{g},{i}]" for g in range(2)
                                                         for i in trace_idx],
                    "value": theta[:2, trace_idx].reshape(-1).astype(np.float64)}))
            if k == steps:
                break
            eta = lrs[k]
            # minibatch gradient obeying <D theta, g> = 0 (translation: <1_A, g> = 0), plus breaking
            decay = 0.35 + 0.65 * np.exp(-3.0 * k / steps)
            g = rng.standard_normal(theta.shape) * sigma / np.sqrt(dim) * decay
            direction = theta * sign if quad else np.ones_like(theta)
            norm2 = (direction * direction).sum(1, keepdims=True)
            g = g - (g * direction).sum(1, keepdims=True) / norm2 * direction
            if kind == "scale":
                g = g / np.sqrt(norm2)  # scale-invariant losses have |g| ~ 1 / |theta|
            # breaking: BatchNorm-eps-like for scale, weaker for rescale, none for translation (exact)
            strength = {"scale": 1.0, "rescale": 0.2, "translation": 0.0}[kind] * breaking
            g = g + strength * direction * np.abs(rng.standard_normal((n_groups, 1))) * 0.02
            g = g.astype(np.float32)
            d = g + np.float32(lam) * theta
            buf = d.copy() if k == 0 else np.float32(beta) * buf + np.float32(1 - tau) * d
            if beta == 0:
                u = d
            elif nesterov:
                u = d + np.float32(beta) * buf
            else:
                u = buf
            g64, u64, b64 = g.astype(np.float64), u.astype(np.float64), buf.astype(np.float64)
            dsign = sign if quad else np.ones(dim)
            bterm[k] = (th64 * dsign * g64).sum(1) if quad else g64.sum(1)
            U = (u64 * u64 * dsign).sum(1) if quad else u64.sum(1)
            V = (u64 * dsign * b64).sum(1) if quad else U
            gsq[k] = (g64 * g64 * dsign).sum(1) if quad else (g64 * g64).sum(1)
            upd[k] = eta * np.sqrt((u64 * u64).sum(1))
            for name, s in st.items():
                b_k = bterm[k] if name == "brk" else 0.0
                lin = lam * s["C"] + b_k  # <D theta_k, d_k>
                if quad:
                    q = lin if k == 0 else beta * s["P"] + (1 - tau) * lin
                    if beta == 0:
                        dtu = lin
                    elif nesterov:
                        dtu = lin + beta * q
                    else:
                        dtu = q
                    s["P"] = q - eta * V
                    s["C"] = s["C"] - 2 * eta * dtu + eta * eta * U
                else:
                    m = lin if k == 0 else beta * s["Q"] + (1 - tau) * lin
                    s["Q"] = m
                    dtu = lin if beta == 0 else (lin + beta * m if nesterov else m)
                    s["C"] = s["C"] - eta * dtu
            # paper: continuous model, one step of dt
            if beta == 0:
                rate = 2 * lam if quad else lam
                src = eta * eta * gsq[k] if quad else 0.0
                p_val = np.exp(-rate * eta) * p_val + src
            else:
                dt = eta * (1 - tau)
                gam = (1 - beta) / (dt * (1 + beta))
                om2 = (4 if quad else 2) * lam / (dt * (1 + beta))
                vel2 = (u64 * u64 * dsign).sum(1) * (eta / dt) ** 2 if quad else 0.0
                acc = 2 * vel2 - 2 * gam * p_dot - om2 * p_val if quad else -2 * gam * p_dot - om2 * p_val
                p_dot = p_dot + dt * acc
                p_val = p_val + dt * p_dot
            theta = theta - np.float32(eta) * u
        names = [f"{kind}:{layer}:{i}" for i in range(n_groups)]
        for i, name in enumerate(names):
            symmetries.append({"kind": kind, "name": name, "layer": layer,
                               "members": [{"param": f"{layer}.weight", "dim": 0, "index": [i], "role":
                                            ("in" if kind == "rescale" else None)}]
                               + ([{"param": f"{layer}.next.weight", "dim": 1, "index": [i], "role": "out"}]
                                  if kind == "rescale" else []),
                               "chain": []})
        sel = logged
        n = len(sel)
        rows.append(pd.DataFrame({
            "step": np.repeat(sel, n_groups).astype(np.int64),
            "group": np.tile(names, n),
            "kind": kind,
            "layer": layer,
            "measured": charge[sel].reshape(-1),
            "predicted_exact": exact[sel].reshape(-1),
            "predicted_breaking": brk[sel].reshape(-1),
            "predicted_paper": paper[sel].reshape(-1),
            "breaking": (brk[sel] - exact[sel]).reshape(-1),
            "breaking_term": bterm[np.minimum(sel, steps - 1)].reshape(-1),
            "lr": np.repeat(lrs[np.minimum(sel, steps - 1)], n_groups),
            "norm": norm[sel].reshape(-1),
            "grad_norm": np.sqrt(np.abs(gsq[np.minimum(sel, steps - 1)])).reshape(-1),
            "angular_update": (upd[np.minimum(sel, steps - 1)] / np.sqrt(norm[sel])).reshape(-1)
            if kind == "scale" else np.nan,
            "valid": True,
        }))
        for k in map(int, sel):
            kk = min(k, steps - 1)
            errs = {name: np.abs(pred[k] - charge[k]) / norm[k]
                    for name, pred in (("exact", exact), ("breaking", brk), ("paper", paper))}
            row: dict[str, Any] = {
                "step": int(k), "layer": layer, "kind": kind, "n_groups": n_groups, "n_valid": n_groups,
                "mean_charge": float(charge[k].mean()),
                "grad_norm": float(np.sqrt(np.abs(gsq[kk]).sum())),
                "angular_update_median": float(np.median(upd[kk] / np.sqrt(norm[k]))) if kind == "scale" else np.nan,
                "effective_lr_median": float(np.median(lrs[kk] / charge[k])) if kind == "scale" else np.nan,
                "lr": float(lrs[kk]),
            }
            for name, e in errs.items():
                row[f"err_{name}_max"] = float(e.max())
                row[f"err_{name}_median"] = float(np.median(e))
            layer_rows.append(row)
    metrics = _synthetic_metrics(steps, rng)
    hyper = {"optimizer": "SGD", "batch_size": 128, "schedule": "step decay x0.1 at 60%",
             "param_groups": [{"lr": lr, "momentum": beta, "dampening": tau, "weight_decay": lam,
                               "nesterov": nesterov, "n_params": len(symmetries)}]}
    constraints = _synthetic_constraints(symmetries, rng)
    manifest = {
        "config": {"name": f"synthetic-{'momentum' if beta else 'sgd'}", "model": "synthetic BN conv net",
                   "dataset": "synthetic", "steps": steps},
        "schema_version": 1,
        "hyperparameters": hyper,
        "versions": {"neural_mechanics": "0.1.0", "torch": "n/a (synthetic)"},
        "status": "complete",
        "symmetries": symmetries,
        "invalid": {},
        "notes": ["synthetic data generated by tests/synthetic_runs.py"],
    }
    groups = pd.concat(rows, ignore_index=True)
    for column in EQUILIBRIUM_COLUMNS:  # logged by the tracker (NaN: this synthetic run predicts none)
        groups[column] = np.nan
    layers = pd.DataFrame(layer_rows)
    for column in LAYER_AGGREGATES:  # the layer medians of those columns, NaN likewise
        if column not in layers.columns:
            layers[column] = np.nan
    return SyntheticRun(groups=groups, layer_frame=layers,
                        metric_frame=metrics, manifest=manifest, symmetries=symmetries,
                        param_trace=pd.concat(trace_rows, ignore_index=True) if trace_rows else pd.DataFrame(),
                        constraints=constraints)


def _synthetic_metrics(steps: int, rng: np.random.Generator) -> pd.DataFrame:
    k = np.arange(steps)
    loss = 2.3 * np.exp(-k / (0.3 * steps)) + 0.35 + 0.08 * rng.standard_normal(steps)
    acc = np.clip(1 - loss / 2.6 + 0.02 * rng.standard_normal(steps), 0, 1)
    every = max(1, steps // 10)
    kv = np.arange(0, steps, every)
    vloss = 2.3 * np.exp(-kv / (0.3 * steps)) + 0.45
    vacc = np.clip(1 - vloss / 2.6, 0, 1)
    parts = [
        pd.DataFrame({"step": k, "split": "train", "name": "loss", "value": loss}),
        pd.DataFrame({"step": k, "split": "train", "name": "accuracy", "value": acc}),
        pd.DataFrame({"step": kv, "split": "val", "name": "loss", "value": vloss}),
        pd.DataFrame({"step": kv, "split": "val", "name": "accuracy", "value": vacc}),
    ]
    return pd.concat(parts, ignore_index=True)


def _synthetic_constraints(symmetries: list[dict[str, Any]], rng: np.random.Generator) -> pd.DataFrame:
    """A constraint report: symmetry residuals near float32 rounding, random directions near 1."""
    n = len(symmetries)
    return pd.DataFrame({
        "name": [s["name"] for s in symmetries],
        "kind": [s["kind"] for s in symmetries],
        "grad_rel": 10 ** rng.normal(-7, 0.5, n),
        "grad_rel_random": 10 ** rng.normal(-0.6, 0.35, n),
        "hess_rel": 10 ** rng.normal(-6.3, 0.5, n),
        "hess_rel_random": 10 ** rng.normal(-0.3, 0.3, n),
    })
