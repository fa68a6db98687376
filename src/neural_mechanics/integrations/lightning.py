"""A PyTorch Lightning callback that attaches the Tracker to the LightningModule's optimizer.

    trainer = lightning.Trainer(callbacks=[NeuralMechanicsCallback("runs/a", example_inputs=x)])

Both optimization modes work. Lightning's automatic optimization calls `optimizer.step(closure)` and runs
forward + backward *inside* `step`; the Tracker's step pre-hook hands `step` a wrapped closure that measures
right after the gradients exist, so automatic and manual optimization (`self.manual_backward(loss)` then
`opt.step()`) log the same rows as a plain loop.

Under a DDP strategy every rank builds a Tracker on its own module (identical predictions), and only global
rank 0 writes the run directory. Sharded strategies are refused at fit start: FSDP through the module itself
(`tracking.sharding.check_not_sharded`: FSDP wrappers, DTensor parameters) and DeepSpeed by the strategy's class,
since ZeRO partitions parameters and optimizer state inside DeepSpeed's own engine, which no module check sees.

The callback rides on the tracking layer only (Tracker, the sharding check, symmetry detection); it never
imports the `nmech train` harness in `experiments/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from neural_mechanics.errors import TrackerError
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.tracking.sharding import check_not_sharded
from neural_mechanics.tracking.tracker import Tracker

try:  # the `lightning` package, else the older standalone `pytorch_lightning`
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef,assignment]
    except ImportError as exc:
        raise ImportError("neural_mechanics.integrations.lightning needs `lightning` (pip install lightning) or "
                          "`pytorch_lightning`") from exc


class NeuralMechanicsCallback(Callback):
    """Track every symmetry of the LightningModule during `trainer.fit`, writing to `run_dir` (rank 0).

    symmetries: a SymmetrySet, or None to detect them at fit start from `example_inputs` (default: the module's
    `example_input_array`) with `loss`. log_every / log_spaced / flush_every: as for `Tracker`. The tracker is
    attached in `on_train_start` (the optimizer exists then) and closed in `on_train_end` (status "finished")
    or `on_exception` (status "failed"). `optimizer_index` picks one of several optimizers.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, symmetries: Any = None, example_inputs: Any = None,
                 loss: Any = "cross_entropy", log_every: int = 10, log_spaced: bool = False, flush_every: int = 200,
                 optimizer_index: int = 0, config: dict[str, Any] | None = None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.symmetries = symmetries
        self.example_inputs = example_inputs
        self.loss = loss
        self.log_every = log_every
        self.log_spaced = log_spaced
        self.flush_every = flush_every
        self.optimizer_index = optimizer_index
        self.config = config
        self.tracker: Any = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Check what can be checked before training (sharding) and detect the symmetries."""
        check_not_sharded(pl_module)
        strategy = type(getattr(trainer, "strategy", None)).__name__
        if "DeepSpeed" in strategy:
            raise TrackerError(f"the trainer's strategy is {strategy}: ZeRO partitions the parameters and the "
                               "optimizer state, and the tracker needs whole parameters at the optimizer step",
                               "train with strategy='ddp' (or a single device) while tracking")
        if self.symmetries is None:
            x = self.example_inputs if self.example_inputs is not None else getattr(pl_module, "example_input_array",
                                                                                    None)
            if x is None:
                raise TrackerError("no symmetries and no example inputs to detect them from",
                                   "pass symmetries=nm.find_symmetries(model, x) or example_inputs=x, or set "
                                   "`example_input_array` on the LightningModule")
            was_training = pl_module.training
            pl_module.train()
            self.symmetries = find_symmetries(pl_module, x.to(pl_module.device) if hasattr(x, "to") else x,
                                              loss=self.loss)
            pl_module.train(was_training)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        if not optimizers:
            raise TrackerError("the Trainer has no optimizer to attach to", "return one from configure_optimizers")
        optimizer = optimizers[self.optimizer_index]
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch one
        rank = int(getattr(trainer, "global_rank", 0))
        self.tracker = Tracker(pl_module, optimizer, self.symmetries, self.run_dir if rank == 0 else None,
                               log_every=self.log_every, log_spaced=self.log_spaced, flush_every=self.flush_every,
                               config=self.config, rank=rank)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the batch loss at the tracker's log steps (the step index of the optimizer step just taken)."""
        if self.tracker is None or self.tracker.step == 0:
            return
        k = self.tracker.step - 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and k % self.log_every == 0:
            self.tracker.log_metrics(k, "train", loss=float(loss.detach() if hasattr(loss, "detach") else loss))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker is not None:
            self.tracker.close("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.tracker is not None:
            self.tracker.close("failed", f"{type(exception).__name__}: {exception}")
