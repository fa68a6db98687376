"""Optimizer strategies: the registry (class MRO), the dampening = 1 decision end to end (function, tracker, manifest,
report agree), and a strategy added from outside the package in one module."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from neural_mechanics.plots import figures as F
from neural_mechanics.plots.report import report_html
from neural_mechanics.plots.source import FigureUnavailable, RunView
from neural_mechanics.theory.applicability import Applicability, Verdict, applicability
from neural_mechanics.tracking.metrics import PREDICTION_COLUMNS
from neural_mechanics.tracking.products import Fields, Product
from neural_mechanics.tracking.rows import Row, base_row
from neural_mechanics.tracking.store import open_run
from neural_mechanics.tracking.strategies import (
    Applies,
    StepContext,
    Strategy,
    register_strategy,
    registered,
    strategy_for,
)
from neural_mechanics.tracking.strategies.adam import AdamStrategy
from neural_mechanics.tracking.strategies.any_optimizer import AnyOptimizerStrategy
from neural_mechanics.tracking.strategies.lion import Lion, LionStrategy
from neural_mechanics.tracking.strategies.muon import MuonStrategy
from neural_mechanics.tracking.strategies.rmsprop import RMSpropStrategy
from neural_mechanics.tracking.strategies.sgd import SGDStrategy
from neural_mechanics.tracking.tracker import Tracker
from reference_tracker import ReferenceTracker
from test_tracking_helpers import BNNet, bn_symmetries, make_data, train

torch.set_num_threads(1)


def _params():
    return [torch.nn.Parameter(torch.zeros(3))]


# ---- registry ------------------------------------------------------------------------------------------------
class KeepsStep(torch.optim.SGD):
    """A subclass that only adds a method: SGD's update rule, so SGD's strategy."""

    def describe(self) -> str:
        return "sgd"


class OwnStep(torch.optim.SGD):
    """A subclass with its own step: not SGD's update rule any more."""

    def step(self, closure=None):
        return super().step(closure)


class OwnAdamStep(torch.optim.AdamW):
    """An AdamW whose step is its own: its update rule is unknown, so it is only measured."""

    def step(self, closure=None):
        return super().step(closure)


def test_registry_walks_the_mro_and_a_subclass_with_its_own_step_falls_back():
    assert strategy_for(torch.optim.SGD(_params(), lr=0.1)) is SGDStrategy
    assert strategy_for(KeepsStep(_params(), lr=0.1)) is SGDStrategy
    assert strategy_for(OwnStep(_params(), lr=0.1)) is AnyOptimizerStrategy
    for cls, strategy in ((torch.optim.Adam, AdamStrategy), (torch.optim.AdamW, AdamStrategy),
                          (torch.optim.RMSprop, RMSpropStrategy), (torch.optim.Muon, MuonStrategy),
                          (Lion, LionStrategy), (torch.optim.Adagrad, AnyOptimizerStrategy),
                          (OwnAdamStep, AnyOptimizerStrategy)):
        params = [torch.nn.Parameter(torch.zeros(3, 2))] if cls is torch.optim.Muon else _params()
        assert strategy_for(cls(params)) is strategy, cls
    reg = registered()
    assert reg[torch.optim.SGD] is SGDStrategy and reg[torch.optim.Optimizer] is AnyOptimizerStrategy


def test_subclass_with_its_own_step_is_tracked_as_any_optimizer(tmp_path):
    net = BNNet()
    opt = OwnStep(net.parameters(), lr=0.05, momentum=0.9)
    with Tracker(net, opt, bn_symmetries(net), tmp_path / "run", log_every=2) as tr:
        train(net, opt, make_data(), 4)
    assert not tr.exact_theory and isinstance(tr.strategy, AnyOptimizerStrategy)
    run = open_run(tmp_path / "run")
    assert "overrides SGD.step" in run.manifest["not_applicable"]
    assert run.manifest["tracker"]["strategy"] == "any_optimizer"
    df = run.frame()
    assert not df["valid"].any() and df["predicted_exact"].isna().all()
    assert np.isfinite(df[df["step"] < 4]["breaking_term"]).all()
    assert all(not v["applies"] and "overrides SGD.step" in v["reason"] for v in run.manifest["applicability"].values())
    with pytest.raises(FigureUnavailable, match=r"no predictions \(OwnStep overrides SGD.step"):
        F.fig_prediction_error(run.dir)
    assert "overrides SGD.step" in report_html(run.dir)


def test_runs_written_before_the_applicability_entry_still_say_why():
    view = RunView(groups=pd.DataFrame(), manifest={"not_applicable": "optimizer Adam has no exact theory (...)"})
    assert set(view.applicability) == set(PREDICTION_COLUMNS)
    assert all(not v["applies"] and "no exact theory" in v["reason"] for v in view.applicability.values())
    assert RunView(groups=pd.DataFrame()).applicability == {}


# ---- dampening = 1 -------------------------------------------------------------------------------------------
def test_dampening_one_exact_predictions_hold_paper_is_not_applicable(tmp_path):
    """The tracker, the manifest, the report and `applicability` say the same: exact and breaking recurrences apply
    (and equal the brute-force reference), the paper's model does not (NaN, with the function's reason)."""
    torch.manual_seed(0)
    net = BNNet(eps=1e-5).double()
    syms = bn_symmetries(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, dampening=1.0, weight_decay=5e-3)
    verdict = applicability(opt, opt.param_groups[0])
    ref = ReferenceTracker(net, opt, syms)
    data = [(x.double(), y) for x, y in make_data()]
    with Tracker(net, opt, syms, tmp_path / "run", log_every=1):
        train(net, opt, data, 30)
    ref.close()
    run = open_run(tmp_path / "run")
    df = run.frame().set_index(["step", "group"])
    assert df["valid"].all() and df["predicted_paper"].isna().all()
    for rec in ref.history:
        rows = df.xs(rec["step"], level="step")
        for s in syms:
            r = rows.loc[s.name]
            scale = max(r["norm"], 1e-12)
            assert abs(r["predicted_exact"] - rec["exact"][s.name]) / scale < 1e-10, (rec["step"], s.name)
            assert abs(r["predicted_breaking"] - rec["breaking"][s.name]) / scale < 1e-10, (rec["step"], s.name)
    assert ((df["predicted_breaking"] - df["measured"]).abs() / df["norm"]).max() < 1e-11
    app = run.manifest["applicability"]
    for kind, v in verdict.items():
        assert app[f"predicted_{kind}"]["applies"] == v.applies
    assert app["predicted_paper"]["reason"] == verdict.paper.reason and "not_applicable" not in run.manifest
    html = report_html(tmp_path / "run")
    assert "not applicable" in html and "here zero" in html
    F.fig_prediction_error(run.dir)  # exact and breaking are there to draw


def test_paper_is_dropped_only_for_the_param_group_with_dampening_one(tmp_path):
    """Groups whose members all sit in the dampening-1 param group lose the paper prediction; the others keep it."""
    torch.manual_seed(0)
    net = BNNet(eps=1e-5)
    syms = bn_symmetries(net)
    conv1 = [net.conv1.weight, net.conv1.bias]
    rest = [p for n, p in net.named_parameters() if not n.startswith("conv1.")]
    opt = torch.optim.SGD([{"params": rest}, {"params": conv1, "dampening": 1.0}], lr=0.05, momentum=0.9)
    with Tracker(net, opt, syms, tmp_path / "run", log_every=5):
        train(net, opt, make_data(), 10)
    run = open_run(tmp_path / "run")
    df = run.frame()
    scale1 = df["group"].str.startswith("conv1.scale")
    assert df[scale1]["predicted_paper"].isna().all() and df[scale1]["valid"].all()
    ok = ~df["group"].isin(list(run.invalid)) & ~scale1
    assert df[ok]["predicted_paper"].notna().all() and df[ok]["predicted_exact"].notna().all()
    assert run.manifest["applicability"]["predicted_paper"] == {
        "applies": False, "reason": applicability(opt, opt.param_groups[1]).paper.reason, "param_groups": [1]}


# ---- a strategy from outside the package, in one module ------------------------------------------------------
class PlainGD(torch.optim.Optimizer):
    """theta <- theta - lr * g: not torch.optim.SGD, so no built-in strategy predicts it."""

    def __init__(self, params: Any, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


@register_strategy(PlainGD)
class PlainGDStrategy(Strategy):
    """The exact identity C_{k+1} = C_k - 2 eta <v, g> + eta^2 <g, D g> (quadratic; linear: T_{k+1} = T_k - eta <1, g>)
    fed the measured terms, as predicted_breaking: what a new optimizer family's strategy looks like."""

    name = "plain_gd"
    exact_theory = True
    memory_note = "none"

    def __init__(self, setup):
        super().__init__(setup)
        self.fields = Fields(self.params)
        self.pred: list[torch.Tensor | None] = [None] * len(self.families)
        self.pending: list[Row | None] = [None] * len(self.families)

    def verdict(self, group):
        no = Verdict(False, "plain gradient descent: only the exact identity is implemented")
        return Applicability(no, Verdict(True, "exact identity of theta <- theta - lr g"), no)

    def pre_step(self, ctx: StepContext, applies: Applies) -> None:
        for i, (fam, hp) in enumerate(zip(self.families, ctx.hypers, strict=True)):
            gg = Product("gg", "grad", "grad")
            out = ctx.reduce(fam, [fam.charge, fam.pairing("B", "grad"), gg, fam.norm_sq], self.fields)
            if self.pred[i] is None:
                self.pred[i] = out["C"]
            lr = torch.as_tensor(hp.lr, dtype=torch.float64)
            if ctx.log:
                row = base_row(fam, out["C"], out["norm2"], None, lr, fam.valid)
                row["predicted_breaking"] = torch.where(applies.masks[i]["breaking"], self.pred[i], torch.nan)
                self.pending[i] = row
            step = -2 * lr * out["B"] + lr * lr * out["gg"] if fam.quadratic else -lr * out["B"]
            self.pred[i] = self.pred[i] + step

    def post_step(self, ctx, applies):
        rows, self.pending = self.pending, [None] * len(self.families)
        return rows if ctx.log else None

    def log_rows(self, ctx, applies):
        return [None] * len(self.families)

    def ready(self, step):
        return False


def test_a_strategy_registered_from_outside_the_package_runs_through_the_tracker(tmp_path):
    torch.manual_seed(0)
    net = BNNet(eps=1e-5).double()
    opt = PlainGD(net.parameters(), lr=0.05)
    assert strategy_for(opt) is PlainGDStrategy
    data = [(x.double(), y) for x, y in make_data()]
    with Tracker(net, opt, bn_symmetries(net), tmp_path / "run", log_every=3) as tr:
        train(net, opt, data, 12)
    assert tr.strategy.name == "plain_gd"
    run = open_run(tmp_path / "run")
    df = run.frame()
    assert sorted(df["step"].unique()) == [0, 3, 6, 9]
    err = ((df["predicted_breaking"] - df["measured"]).abs() / df["norm"]).max()
    assert err < 1e-12, err
    moved = df[df.step == 9].set_index("group")["measured"] - df[df.step == 0].set_index("group")["measured"]
    assert (moved.abs() / df[df.step == 0].set_index("group")["norm"]).max() > 1e-4  # eta^2 |g|^2 moves them
    assert df["predicted_exact"].isna().all() and df["valid"].all()
    app = run.manifest["applicability"]
    assert app["predicted_breaking"]["applies"] and not app["predicted_paper"]["applies"]
    assert math.isnan(run.layers()["err_exact_max"].iloc[0])
