"""Step-time and memory overhead of the Tracker on the paper's VGG-16-BN (Tiny ImageNet variant), CPU.

    .venv/bin/python benchmarks/tracker_overhead.py [--steps 20] [--batch 32] [--optim heavy_ball]
    .venv/bin/python benchmarks/tracker_overhead.py --optim adamw     # AdamW: the identity strategy (issue 14)

Trains the same model from the same state for `--steps` timed steps three ways, interleaved in rounds so that
machine drift hits all alike: no tracker (baseline), Tracker logging every 10 steps (to a temp run_dir), and
reports the median step time of each and the ratio against the baseline measured in the same run (target
<= 1.03), plus the tracker's resident memory (index tensors + per-step temporaries, measured as the growth of
the process's peak RSS) and its number of groups. The symmetry set comes from `find_symmetries` when that
exists, else hand-built per-channel groups.

On a shared machine the step-time ratio is only as good as the load is steady (other processes on the same
cores move single steps by 10% and more, and with several torch threads on busy cores every parallel region
can stall). So the script also times the tracker's own work directly, the wall time spent inside its optimizer
hooks per step, and reports it against the baseline step: `hook share` = median hook time / median baseline
step, the load-robust estimate of (ratio - 1). `--threads 1` makes both numbers steadier on a busy machine.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from typing import Any

import torch
from torch import nn

from neural_mechanics.symmetry.groups import Member, Symmetry, SymmetrySet
from neural_mechanics.tracking import tracker as tracker_module
from neural_mechanics.tracking.tracker import Tracker

HOOK_SECONDS: list[float] = []
"""Wall time spent inside the tracker's pre + post hooks, one entry per optimizer step."""


def _timed_hooks() -> None:
    """Wrap Tracker._pre_hook / _post_hook (class level, before any Tracker exists) to record their time."""
    pre, post = tracker_module.Tracker._pre_hook, tracker_module.Tracker._post_hook

    def timed_pre(self: Any, *a: Any) -> None:
        t0 = time.perf_counter()
        pre(self, *a)
        HOOK_SECONDS.append(time.perf_counter() - t0)

    def timed_post(self: Any, *a: Any) -> None:
        t0 = time.perf_counter()
        post(self, *a)
        HOOK_SECONDS[-1] += time.perf_counter() - t0

    tracker_module.Tracker._pre_hook = timed_pre  # type: ignore[method-assign, assignment]
    tracker_module.Tracker._post_hook = timed_post  # type: ignore[method-assign, assignment]


def build_model() -> nn.Module:
    try:
        from neural_mechanics.experiments.models import vgg16

        return vgg16(num_classes=200, input_size=64, batch_norm=True)
    except ImportError:
        import torchvision

        return torchvision.models.vgg16_bn(num_classes=200)


def hand_symmetries(model: nn.Module) -> SymmetrySet:
    """Per-channel groups: scale (conv -> BN), rescale (BN -> next conv or flatten block, Linear -> Linear),
    translation (columns and bias of the last Linear)."""
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    syms: list[Symmetry] = []
    for i, (name, m) in enumerate(mods):
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(m, nn.Conv2d):
            for c in range(m.out_channels):
                syms.append(Symmetry("scale", f"{name}.s{c}", (Member(f"{name}.weight", 0, (c,)),
                                                                 Member(f"{name}.bias", 0, (c,))), layer=name))
        elif isinstance(m, nn.BatchNorm2d) and nxt is not None:
            nname, nm = nxt
            block = nm.in_features // m.num_features if isinstance(nm, nn.Linear) else 1
            for c in range(m.num_features):
                idx = tuple(range(c * block, (c + 1) * block))
                syms.append(Symmetry("rescale", f"{name}.r{c}", (
                    Member(f"{name}.weight", 0, (c,), "in"), Member(f"{name}.bias", 0, (c,), "in"),
                    Member(f"{nname}.weight", 1, idx, "out")), layer=name))
        elif isinstance(m, nn.Linear) and nxt is not None:
            nname = nxt[0]
            for c in range(m.out_features):
                syms.append(Symmetry("rescale", f"{name}.r{c}", (
                    Member(f"{name}.weight", 0, (c,), "in"), Member(f"{name}.bias", 0, (c,), "in"),
                    Member(f"{nname}.weight", 1, (c,), "out")), layer=name))
        elif isinstance(m, nn.Linear):
            for j in range(m.in_features):
                syms.append(Symmetry("translation", f"{name}.t{j}", (Member(f"{name}.weight", 1, (j,)),), layer=name))
            syms.append(Symmetry("translation", f"{name}.tb", (Member(f"{name}.bias"),), layer=name))
    return SymmetrySet(syms)


def symmetries_for(model: nn.Module, x: torch.Tensor) -> tuple[SymmetrySet, str]:
    try:
        from neural_mechanics.symmetry.detect import find_symmetries

        return find_symmetries(model, x[:4]), "find_symmetries"
    except Exception as e:  # not written yet, or failed on this model
        return hand_symmetries(model), f"hand-built ({type(e).__name__})"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--optim", choices=["sgd", "heavy_ball", "nesterov", "adamw"], default="heavy_ball",
                    help="SGD variants, or AdamW (lr 1e-3, weight decay 0.05: the tracker reads u_k from its state)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _timed_hooks()
    torch.manual_seed(0)
    model = build_model()
    x = torch.randn(args.batch, 3, 64, 64)
    y = torch.randint(0, 200, (args.batch,))
    syms, source = symmetries_for(model, x)
    kw: dict[str, Any] = {"sgd": {"weight_decay": 5e-4}, "heavy_ball": {"momentum": 0.9, "weight_decay": 5e-4},
          "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
          "adamw": {"weight_decay": 0.05}}[args.optim]
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3, **kw) if args.optim == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.01, **kw))
    loss_fn = nn.CrossEntropyLoss()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {type(model).__name__}, {n_params / 1e6:.1f}M params; batch {args.batch}; "
          f"torch threads {torch.get_num_threads()}; optimizer {type(opt).__name__} {kw}")
    print(f"symmetries ({source}): {syms!r}")

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(3):   # warm up (allocator, momentum buffers)
        step()
    base: list[float] = []
    tracked: list[float] = []
    rss0 = peak_rss_mb()
    rss_tracker = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            base += [step() for _ in range(args.steps)]
            before = peak_rss_mb()
            t_build = time.perf_counter()
            tr = Tracker(model, opt, syms, f"{tmp}/run{r}", log_every=10)
            t_build = time.perf_counter() - t_build
            tracked += [step() for _ in range(args.steps)]
            tr.close()
            rss_tracker = max(rss_tracker, peak_rss_mb() - before)
    mb, mt = statistics.median(base), statistics.median(tracked)
    mean_b, mean_t = statistics.fmean(base), statistics.fmean(tracked)
    print(f"step time  baseline median {mb * 1e3:8.1f} ms   mean {mean_b * 1e3:8.1f} ms")
    print(f"step time  tracker  median {mt * 1e3:8.1f} ms   mean {mean_t * 1e3:8.1f} ms  (log_every=10)")
    print(f"ratio      median {mt / mb:.3f}   mean {mean_t / mean_b:.3f}   (target <= 1.03)")
    hooks = HOOK_SECONDS[1:]  # the first step after construction measures everything once (see Tracker._start)
    mh = statistics.median(hooks) if hooks else float("nan")
    print(f"hooks      median {mh * 1e3:8.1f} ms per step, max {max(hooks, default=float('nan')) * 1e3:.1f} ms; "
          f"hook share {mh / mb:.4f} of the baseline step (load-robust estimate of ratio - 1)")
    print(f"tracker construction {t_build * 1e3:.0f} ms; peak RSS growth while tracking {rss_tracker:.1f} MB "
          f"(process peak before {rss0:.0f} MB; parameters {n_params * 4 / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
