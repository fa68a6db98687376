"""Brute-force harness for the theory tests: run stock torch.optim.SGD on a tiny float64 net with exact
symmetries of all three kinds and measure every per-group input of docs/theory.md section 5 from dense masks.

Model: Linear(5, 6) -> BatchNorm(6, eps) (written out, eps = 0 allowed) -> ReLU -> Linear(6, 4) -> cross-entropy.
- scale (per channel c): lin1.weight[c, :], lin1.bias[c]   (exact when eps = 0 and the batch variance > 0)
- rescale (per channel c): bn.weight[c], bn.bias[c] (A1) / lin2.weight[:, c] (A2)   (ReLU is homogeneous)
- translation: lin2.weight[:, j] per input j, and lin2.bias   (softmax shift)
u_k is measured as (theta_k - theta_{k+1}) / eta_k from parameter copies, b_k from optimizer.state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet

torch.set_num_threads(1)


class BatchNorm(nn.Module):
    """Train-mode batch normalisation written out, so that eps = 0 is allowed (torch's BatchNorm refuses it)."""

    def __init__(self, n: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        xc = x - x.mean(0)
        return xc / torch.sqrt((xc * xc).mean(0) + self.eps) * self.weight + self.bias


class Net(nn.Module):
    def __init__(self, eps: float = 0.0):
        super().__init__()
        self.lin1 = nn.Linear(5, 6)
        self.bn = BatchNorm(6, eps)
        self.lin2 = nn.Linear(6, 4)

    def forward(self, x):
        return self.lin2(F.relu(self.bn(self.lin1(x))))


def symmetries() -> SymmetrySet:
    out = []
    for c in range(6):
        out.append(Symmetry("scale", f"scale{c}", (Member("lin1.weight", 0, (c,)), Member("lin1.bias", 0, (c,)))))
    for c in range(6):
        out.append(Symmetry("rescale", f"rescale{c}", (Member("bn.weight", 0, (c,), "in"),
                                                        Member("bn.bias", 0, (c,), "in"),
                                                        Member("lin2.weight", 1, (c,), "out"))))
    for j in range(6):
        out.append(Symmetry("translation", f"trans{j}", (Member("lin2.weight", 1, (j,)),)))
    out.append(Symmetry("translation", "trans_bias", (Member("lin2.bias"),)))
    return SymmetrySet(out)


@dataclass
class Config:
    lr: float = 0.05
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    steps: int = 200
    schedule: str = "const"        # "const" | "cosine_warmup" | "onecycle" (OneCycleLR: cycles momentum too)
    momentum_phases: tuple[tuple[int, float], ...] = ()  # (from step, momentum) switches, e.g. off and back on
    clip: float | None = None      # global-norm clipping
    accum: int = 1                 # micro-batches per step
    l1: float = 0.0                # L1 penalty on lin2.weight[:, :3] and lin1.weight[:2] (breaks symmetries)
    eps: float = 0.0               # BatchNorm eps (breaks scale)
    batch: int = 16
    full_batch: bool = False
    seed: int = 0
    split_groups: bool = False     # lin1 in a plain-SGD param group, the rest with the config's momentum
    data_n: int = 64


def _loss(model, x, y, cfg: Config):
    loss = F.cross_entropy(model(x), y)
    if cfg.l1:
        loss = loss + cfg.l1 * (model.lin2.weight[:, :3].abs().sum() + model.lin1.weight[:2].abs().sum())
    return loss


def make_run(cfg: Config):
    torch.manual_seed(cfg.seed)
    model = Net(cfg.eps).double()
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening, weight_decay=cfg.weight_decay,
              nesterov=cfg.nesterov, maximize=cfg.maximize)
    if cfg.split_groups:
        rest = [p for n, p in model.named_parameters() if not n.startswith("lin1")]
        opt = torch.optim.SGD([{"params": list(model.lin1.parameters()), "momentum": 0.0, "nesterov": False,
                                "dampening": 0.0, "lr": cfg.lr * 0.7, "weight_decay": cfg.weight_decay * 2},
                               {"params": rest}], **kw)
    else:
        opt = torch.optim.SGD(model.parameters(), **kw)
    if cfg.schedule == "cosine_warmup":
        warm = max(cfg.steps // 10, 1)

        def f(k):
            if k < warm:
                return (k + 1) / warm
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (k - warm) / max(cfg.steps - warm, 1)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    elif cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps,
                                                    base_momentum=0.8, max_momentum=0.95)
    else:
        sched = None
    x = torch.randn(cfg.data_n, 5, dtype=torch.float64) * 2 + 0.3
    y = torch.randint(0, 4, (cfg.data_n,))
    return model, opt, sched, x, y


def dense_masks(model, syms: SymmetrySet):
    """Per kind: list of names, dict param -> D tensor [G, *shape] (float64)."""
    params = dict(model.named_parameters())
    out = {}
    for kind in ("scale", "rescale", "translation"):
        sub = syms.filter(kind=kind)
        D = {n: torch.zeros((len(sub), *p.shape), dtype=torch.float64) for n, p in params.items()}
        for i, s in enumerate(sub):
            for n, m in s.masks(params).items():
                D[n][i] = m.detach().double()
        out[kind] = D
    return out


def _dot(D, a, b):
    """Per group sum over params of D * a * b  -> [G]."""
    return sum((D[n] * (a[n] * b[n]).unsqueeze(0)).flatten(1).sum(1) for n in D)


def _lin(D, a):
    return sum((D[n] * a[n].unsqueeze(0)).flatten(1).sum(1) for n in D)


def simulate(cfg: Config, *, start_at: int = 0):
    """Run `cfg.steps` steps; return per kind a dict of stacked measurements and per-step hyperparameters.

    Quadratic kinds: C [K+1, G], U, V, B, gsq, vsq [K, G]; translation: T [K+1, G], B [K, G].
    hp: per step a list of dicts (per symmetry group index by param group) -> lr etc. as [K, G] tensors.
    start_at: steps run before measuring starts (to test attaching to an optimizer with buffers);
    then also returns overlap0 = <D theta_0, b_{-1}>.
    """
    model, opt, sched, x, y = make_run(cfg)
    syms = symmetries()
    masks = dense_masks(model, syms)
    params = dict(model.named_parameters())
    group_of = {id(p): gi for gi, g in enumerate(opt.param_groups) for p in g["params"]}
    # every symmetry group's members live in one param group (by construction): take the first member's
    pg_index = {}
    for kind in masks:
        pg_index[kind] = torch.tensor([group_of[id(params[s.members[0].param])] for s in syms.filter(kind=kind)])
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rec = {k: {"C": [], "U": [], "V": [], "B": [], "gsq": [], "vsq": []} for k in masks}
    hps = []
    overlap0 = None

    def state(name):
        st = opt.state[params[name]]
        return st.get("momentum_buffer") if st else None

    total = start_at + cfg.steps
    for k in range(total):
        measuring = k >= start_at
        theta = {n: p.detach().clone() for n, p in params.items()}
        if measuring and k == start_at:
            for kind, D in masks.items():
                q = kind != "translation"
                rec[kind]["C"].append(_dot(D, theta, theta) if q else _lin(D, theta))
            if start_at and cfg.momentum:
                overlap0 = {}
                for kind, D in masks.items():
                    b = {n: state(n) for n in params}
                    overlap0[kind] = _dot(D, theta, b) if kind != "translation" else _lin(D, b)
        for start, beta in cfg.momentum_phases:
            if k == start:
                for pg in opt.param_groups:
                    pg["momentum"] = beta
        opt.zero_grad(set_to_none=True)
        if cfg.full_batch:
            _loss(model, x, y, cfg).backward()
        else:
            idx = torch.randperm(cfg.data_n, generator=gen)[: cfg.batch * cfg.accum]
            for chunk in idx.chunk(cfg.accum):
                (_loss(model, x[chunk], y[chunk], cfg) / cfg.accum).backward()
        if cfg.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        g = {n: p.grad.detach().clone() for n, p in params.items()}
        pg_vals = [{f: pg[f] for f in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
                   for pg in opt.param_groups]
        opt.step()
        if sched is not None:
            sched.step()
        if not measuring:
            continue
        theta1 = {n: p.detach().clone() for n, p in params.items()}
        lr_p = {n: pg_vals[group_of[id(p)]]["lr"] for n, p in params.items()}
        u = {n: (theta[n] - theta1[n]) / lr_p[n] for n in params}
        b = {n: (state(n) if state(n) is not None else torch.zeros_like(theta[n])) for n in params}
        for kind, D in masks.items():
            r = rec[kind]
            if kind == "translation":
                r["C"].append(_lin(D, theta1))
                r["B"].append(_lin(D, g))
                continue
            r["C"].append(_dot(D, theta1, theta1))
            r["U"].append(_dot(D, u, u))
            r["V"].append(_dot(D, u, b))
            r["B"].append(_dot(D, theta, g))
            r["gsq"].append(_dot(D, g, g))
            r["vsq"].append(_dot(D, b, b))
        hps.append(pg_vals)
    out = {}
    for kind, r in rec.items():
        out[kind] = {k: torch.stack(v) for k, v in r.items() if v}
        idx = pg_index[kind]
        for f in ("lr", "momentum", "dampening", "weight_decay"):
            out[kind][f] = torch.tensor([[float(pv[i][f]) for i in idx] for pv in hps], dtype=torch.float64)
        for f in ("nesterov", "maximize"):
            out[kind][f] = torch.tensor([[bool(pv[i][f]) for i in idx] for pv in hps])
        # scale for relative errors: sum |D| theta^2 (quadratic) or sum |D| |theta| (linear), at the end
        Dabs = {n: d.abs() for n, d in masks[kind].items()}
        end = {n: p.detach() for n, p in params.items()}
        out[kind]["scale"] = (_dot(Dabs, end, end) if kind != "translation"
                              else _lin(Dabs, {n: t.abs() for n, t in end.items()}))
        if overlap0 is not None:
            out[kind]["overlap0"] = overlap0[kind]
    return out


def hyper_at(m: dict, k: int):
    from neural_mechanics.theory.hyper import Hyper

    return Hyper(lr=m["lr"][k], momentum=m["momentum"][k], dampening=m["dampening"][k],
                 weight_decay=m["weight_decay"][k], nesterov=m["nesterov"][k], maximize=m["maximize"][k])


def run_exact(m: dict, kind: str, *, breaking: bool, overlap0=None):
    """Predicted charges [K+1, G] from the exact recurrence fed with the measured inputs."""
    from neural_mechanics.theory.exact import LinearRecurrence, QuadraticRecurrence

    K = m["lr"].shape[0]
    if kind == "translation":
        rec = LinearRecurrence(m["C"][0], overlap0=overlap0)
        preds = [rec.charge] + [rec.step(hyper_at(m, k), m["B"][k] if breaking else None) for k in range(K)]
    else:
        recq = QuadraticRecurrence(m["C"][0], overlap0=overlap0)
        preds = [recq.charge] + [recq.step(hyper_at(m, k), m["U"][k], m["V"][k], m["B"][k] if breaking else None)
                                 for k in range(K)]
    return torch.stack(preds)


def rel_err(pred, m):
    return ((pred - m["C"]).abs() / m["scale"]).max().item()
