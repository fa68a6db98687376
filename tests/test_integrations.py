"""Optional integrations: the Lightning callback against a plain loop with the same Tracker, and TensorBoard scalars
read back against the run store. Skipped when `lightning` / `tensorboard` are not installed.

Also the tracker limitation the Lightning work found: `optimizer.step(closure)` (how Lightning's automatic
optimization and LBFGS-style loops step) computes the gradients inside `step`, after the tracker's pre-hook.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.store import open_run
from test_train import tiny_cfg

torch.set_num_threads(1)


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _reference_loop(tmp_path, steps: int, batch: int = 16, use_closure: bool = False) -> pd.DataFrame:
    """A plain PyTorch loop with the Tracker: the reference the integrations must reproduce."""
    from neural_mechanics.symmetry.detect import find_symmetries
    from neural_mechanics.tracking.tracker import Tracker

    x, y = _data()
    model = _model()
    syms = find_symmetries(model, x[:16])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    out = tmp_path / ("closure" if use_closure else "plain")
    with Tracker(model, opt, syms, out, log_every=1):
        for k in range(steps):
            i = (k * batch) % len(x)
            xb, yb = x[i:i + batch], y[i:i + batch]

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            if use_closure:
                opt.step(closure)
            else:
                closure()
                opt.step()
    return open_run(out).frame()


# ---- Lightning ----------------------------------------------------------------------------------------------


def _lightning_module(automatic: bool):
    L = pytest.importorskip("lightning.pytorch")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()
            self.automatic_optimization = automatic
            self.example_input_array = _data()[0][:16]

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            loss = nn.functional.cross_entropy(self(xb), yb)
            if not automatic:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)

    return L, Tiny()


def _fit(L, module, callback, steps: int) -> None:
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[callback])
    trainer.fit(module, loader)


@pytest.mark.parametrize("automatic", [False, True], ids=["manual", "automatic"])
def test_lightning_callback_matches_a_plain_loop(tmp_path, automatic):
    """Manual optimization (backward, then step) and automatic optimization (step(closure)) log the same rows."""
    L, module = _lightning_module(automatic=automatic)
    from neural_mechanics.integrations.lightning import NeuralMechanicsCallback

    cb = NeuralMechanicsCallback(tmp_path / "lightning", log_every=1)
    _fit(L, module, cb, steps=6)
    assert cb.tracker is not None and cb.tracker.closed and cb.tracker.step == 6
    run = open_run(tmp_path / "lightning")
    assert run.status == "finished"
    got = run.frame()
    ref = _reference_loop(tmp_path, steps=6)
    assert len(got) == len(ref) > 0 and got["valid"].all()
    assert (got["group"].str.replace("net.", "", regex=False) == ref["group"]).all()
    norm = ref["norm"].to_numpy()
    for col in ("measured", "predicted_exact", "predicted_breaking", "predicted_paper"):
        err = np.abs(got[col].to_numpy() - ref[col].to_numpy()) / norm
        assert np.nanmax(err) <= 1e-9, col
    assert set(run.metrics()["name"]) == {"loss"}


def test_lightning_callback_refuses_a_deepspeed_strategy(tmp_path):
    """ZeRO shards inside DeepSpeed's engine, where no module check sees it: the strategy's class is refused."""
    pytest.importorskip("lightning")
    from neural_mechanics.errors import TrackerError
    from neural_mechanics.integrations.lightning import NeuralMechanicsCallback

    class DeepSpeedStrategy:  # named as Lightning's; deepspeed itself is not installed here
        pass

    class Trainer:
        strategy = DeepSpeedStrategy()

    module = _model()
    module.device = torch.device("cpu")  # as a LightningModule has
    cb = NeuralMechanicsCallback(tmp_path / "ds", example_inputs=_data()[0][:4])
    with pytest.raises(TrackerError, match="DeepSpeedStrategy"):
        cb.on_fit_start(Trainer(), module)
    Trainer.strategy = object()  # any other strategy goes on to detection
    cb.on_fit_start(Trainer(), module)
    assert cb.symmetries is not None and len(cb.symmetries) > 0


def test_tracker_with_a_closure_equals_backward_then_step(tmp_path):
    plain = _reference_loop(tmp_path, steps=4)
    closure = _reference_loop(tmp_path, steps=4, use_closure=True)
    pd.testing.assert_frame_equal(plain, closure)


# ---- TensorBoard --------------------------------------------------------------------------------------------


def test_tensorboard_scalars_equal_the_stored_layer_aggregates(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from neural_mechanics.integrations.tensorboard import write_scalars

    run_dir = tmp_path / "run"
    run_training(tiny_cfg("steps=8", "model=digits-vgg-bn", "tracker.log_every=2"), run_dir=run_dir, progress=False)
    log_dir = write_scalars(run_dir)
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    layers = open_run(run_dir).layers()
    checked = 0
    for row in layers.to_dict("records"):
        for col in ("mean_charge", "err_exact_max", "grad_norm"):
            tag = f"{row['kind']}/{row['layer']}/{col}"
            if not np.isfinite(row[col]):
                continue
            events = {e.step: e.value for e in acc.Scalars(tag)}
            assert events[row["step"]] == pytest.approx(row[col], rel=1e-6, abs=1e-30)  # stored as float32
            checked += 1
    assert checked > 20
    assert "metrics/train/loss" in tags and any(t.startswith("scale/") for t in tags)
