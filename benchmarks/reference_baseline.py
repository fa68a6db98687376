"""The Tracker against the reference implementation's approach, on the paper's VGG-16-BN (CPU, batch 32).

    .venv/bin/python benchmarks/reference_baseline.py [--steps 20] [--log-every 10] [--threads 1]

The paper's reference code kept the theory's integrals as per-element buffers inside the optimizer (one
float32 tensor the size of every parameter per integral: |g|^2 for SGD; the two exponential modes for
momentum) and wrote a full checkpoint (model + optimizer, buffers included) at every logged step, from which
the per-filter charges were recomputed offline. That approach is rebuilt minimally here: the buffers live in
`optimizer.state[p]`, are updated elementwise in a step post hook, and `torch.save` writes model + optimizer
state to disk every `--log-every` steps. Against it, the Tracker: per-group float64 reductions, nothing per
element, Parquet rows per logged step.

Printed, each measured in this run against the untracked baseline of the same run:
  step-time ratio (median step / median baseline step), extra memory held (bytes of buffers or tracker
  state), and bytes written to disk per logged step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neural_mechanics.experiments.models import vgg16
from neural_mechanics.symmetry.detect import find_symmetries
from neural_mechanics.tracking.tracker import Tracker


class ReferenceIntegrals:
    """Per-element integral buffers kept in the optimizer's state, as the reference code did.

    SGD: I <- exp(-2 lambda eta) I + eta^2 g^2 (one buffer). Momentum: two decayed running sums of
    |theta'|^2 = (eta b / h)^2, one per exponential mode (two buffers), each I_m <- r_m I_m + (eta b)^2.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, momentum: float):
        self.optimizer = optimizer
        self.n_buffers = 2 if momentum > 0 else 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state[p]
                for m in range(self.n_buffers):
                    st[f"integral_{m}"] = torch.zeros_like(p)
        self.handle = optimizer.register_step_post_hook(self._update)

    @torch.no_grad()
    def _update(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = optimizer.state[p]
                source = st.get("momentum_buffer", p.grad)
                for m in range(self.n_buffers):
                    decay = torch.exp(torch.tensor(-2.0 * wd * lr * (m + 1)))
                    st[f"integral_{m}"].mul_(decay).addcmul_(source, source, value=lr * lr)

    def bytes_held(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                   for k, t in st.items() if k.startswith("integral_"))

    def close(self) -> None:
        self.handle.remove()


def tracker_bytes(tracker: Tracker) -> int:
    """Bytes of the tensors a Tracker keeps between steps (compiled incidence + recurrence states)."""
    seen: set[int] = set()
    total = 0

    def visit(obj: Any, depth: int = 0) -> None:
        nonlocal total
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, list | tuple):
            for v in obj:
                visit(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module | torch.optim.Optimizer):
            visit(vars(obj), depth + 1)

    for fam in tracker.families:
        visit(fam)
    return total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(variant: str, steps: int, log_every: int, batch: int, momentum: float, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = vgg16(200, 64, batch_norm=True).train()
    x = torch.randn(batch, 3, 64, 64)
    y = torch.randint(0, 200, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum, weight_decay=5e-4)
    out = Path(tempfile.mkdtemp(prefix=f"nm-bench-{variant}-"))
    tracker: Tracker | None = None
    reference: ReferenceIntegrals | None = None
    if variant == "tracker":
        tracker = Tracker(model, opt, find_symmetries(model, x[:8]), out / "run", log_every=log_every)
    elif variant == "reference":
        reference = ReferenceIntegrals(opt, momentum)
    times: list[float] = []
    logged = 0
    for k in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if (k + 1) % log_every == 0:
            logged += 1
            if reference is not None:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out / f"ckpt-{k + 1}.pt")
            elif tracker is not None:
                tracker.flush()
        times.append(time.perf_counter() - t0)
    held = 0
    if tracker is not None:
        held = tracker_bytes(tracker)
        tracker.close()
    if reference is not None:
        held = reference.bytes_held()
        reference.close()
    disk = dir_bytes(out)
    if tracker is not None:  # the manifest is written once per run, not per logged step
        disk -= (out / "run" / "manifest.json").stat().st_size
    return {"step": statistics.median(times[1:]), "mean": statistics.fmean(times[1:]), "held": float(held),
            "disk_per_log": disk / max(logged, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {v: run(v, args.steps, args.log_every, args.batch, args.momentum)
               for v in ("baseline", "tracker", "reference")}
    params = sum(p.numel() * 4 for p in vgg16(200, 64, batch_norm=True).parameters())
    base = results["baseline"]["step"]
    print(f"VGG-16-BN (Tiny ImageNet variant), batch {args.batch}, momentum {args.momentum}, log every "
          f"{args.log_every}, {args.steps} steps, {torch.get_num_threads()} threads; parameters {params / 1e6:.1f} MB")
    print("median step: typical step; mean step: includes the logged steps (checkpoints, flushes)")
    mean_base = results["baseline"]["mean"]
    print(f"{'variant':<10} {'median (ms)':>11} {'ratio':>7} {'mean (ms)':>10} {'ratio':>7} {'extra memory (MB)':>18} "
          f"{'x params':>9} {'disk per logged step (MB)':>26}")
    for v, r in results.items():
        print(f"{v:<10} {r['step'] * 1e3:>11.1f} {r['step'] / base:>7.3f} {r['mean'] * 1e3:>10.1f} "
              f"{r['mean'] / mean_base:>7.3f} {r['held'] / 1e6:>18.2f} {r['held'] / params:>9.3f} "
              f"{r['disk_per_log'] / 1e6:>26.3f}")
    t, ref = results["tracker"], results["reference"]
    print(f"reference / tracker: mean step time x{ref['mean'] / t['mean']:.2f}, "
          f"memory x{ref['held'] / max(t['held'], 1):.0f}, "
          f"disk per logged step x{ref['disk_per_log'] / max(t['disk_per_log'], 1):.0f}")


if __name__ == "__main__":
    main()
