"""torchrun worker and model for tests/test_fsdp.py: `python -m torch.distributed.run ... fsdp_worker.py RUN_ROOT`.

Trains `RUNS` (SGD with momentum and weight decay, AdamW) one after the other in one process group (one launch for
both: launches dominate the test's time), with distributed.strategy=fsdp2, into RUN_ROOT/<name>. The model
(`fsdp_worker:residual_rmsnorm_net`, importable with tests/ on PYTHONPATH) has row counts that 2 ranks split
unevenly (21 -> 11 + 10, 13 -> 7 + 6, 1 -> 1 + 0), an RMSNorm and a residual stream.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

ARGS = ("model=fsdp_worker:residual_rmsnorm_net", "steps=24", "batch_size=32", "grad_accumulation=2",
        "tracker.log_every=1", "checkpoint_every=8", "eval_every=8", "distributed.strategy=fsdp2")
RUNS = {"sgd": (), "adamw": ("optimizer.name=adamw", "optimizer.lr=0.01", "optimizer.momentum=0.0")}
"""Run name -> overrides on top of ARGS (test_train.tiny_cfg's SGD: lr 0.05, momentum 0.9, weight decay 5e-4)."""


class ResidualRMSNet(nn.Module):
    """x (8x8 digits, flattened) -> inp: Linear(64, 21) -> h; h += down(relu(up(RMSNorm(h)))) with up 21 -> 13;
    h += expand(relu(squeeze(h))) with a one-neuron bottleneck 21 -> 1 -> 21; head: Linear(21, classes)(relu(h)).

    Symmetries: a rescale group per hidden neuron of up/down (13) and of the bottleneck (1, its row lives on rank 0
    only: rank 1 holds zero rows of `squeeze`), the RMSNorm gains against the columns of `up` (members along dim 1
    of a dim-0-sharded weight), and the translations of the softmax.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.inp = nn.Linear(64, 21)
        self.norm = nn.RMSNorm(21)
        self.up = nn.Linear(21, 13)
        self.down = nn.Linear(13, 21)
        self.squeeze = nn.Linear(21, 1)
        self.expand = nn.Linear(1, 21)
        self.head = nn.Linear(21, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x.flatten(1))
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        h = h + self.expand(torch.relu(self.squeeze(h)))
        return self.head(torch.relu(h))


def residual_rmsnorm_net(num_classes: int = 10) -> nn.Module:
    return ResidualRMSNet(num_classes)


def main() -> None:
    import os

    from neural_mechanics.experiments.distributed import dist_info, process_group
    from neural_mechanics.experiments.train import run_training
    from test_train import tiny_cfg

    torch.set_num_threads(1)
    root = sys.argv[1]
    with process_group(torch.device("cpu"), dist_info()[1]):  # one group for both runs (each leaves it alone)
        for name, extra in RUNS.items():
            run_training(tiny_cfg(*ARGS, *extra), run_dir=os.path.join(root, name), progress=False)


if __name__ == "__main__":
    main()
