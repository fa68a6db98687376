"""torchrun worker for tests/test_distributed.py: `python -m torch.distributed.run ... tests/ddp_worker.py RUN MODE`.

MODE: "full" (train to the end), "stop" (stop after STOP steps, as if killed right after a checkpoint),
"resume" (continue a stopped run). The model (`ddp_worker:dropout_mlp`, importable with tests/ on PYTHONPATH)
has dropout, so the ranks draw random masks every step: a resumed rank must continue its own random stream.
"""

from __future__ import annotations

import sys

from torch import nn

STOP = 10
ARGS = ("model=ddp_worker:dropout_mlp", "steps=20", "batch_size=32", "tracker.log_every=1", "checkpoint_every=5",
        "eval_every=0")


def dropout_mlp(num_classes: int = 10) -> nn.Module:
    """Flatten -> Linear(64, 48) -> ReLU -> Dropout(0.3) -> Linear(48, classes): rescale and translation groups."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.3), nn.Linear(48, num_classes))


def main() -> None:
    import torch

    from neural_mechanics.experiments.train import run_training
    from test_train import tiny_cfg

    torch.set_num_threads(1)
    run_dir, mode = sys.argv[1], sys.argv[2]
    cfg = tiny_cfg(*ARGS)
    if mode == "full":
        run_training(cfg, run_dir=run_dir, progress=False)
    elif mode == "stop":
        run_training(cfg, run_dir=run_dir, progress=False, stop_after=STOP)
    else:
        run_training(cfg, run_dir=run_dir, progress=False, resume=True)


if __name__ == "__main__":
    main()
