"""Detection and certification time for resnet50 and vit_b_16 on CPU (target: detection <= 2 s per model).

    .venv/bin/python benchmarks/detection_speed.py [--models resnet50 vit_b_16] [--size 224] [--batch 2]
                                                    [--repeats 3] [--threads 1] [--sample 8]

For each model (torchvision, random weights, train mode, 1000 classes), a batch of `--batch` images of
`--size` x `--size`: `find_symmetries` is timed `--repeats` times (the median is reported, the first call
pays one-off imports and dispatcher warm-up and is reported separately), split into its phases (graph
capture, op rules, channel groups, translation groups), then `certify` once (float64 copy, all groups at
once per kind plus `--sample` single groups per kind). Times are wall-clock seconds on this process's
threads; on a shared machine run it when the cores are idle (`uptime`), other load inflates every number.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from neural_mechanics.symmetry import detect
from neural_mechanics.symmetry.capture import capture
from neural_mechanics.symmetry.certify import certify
from neural_mechanics.symmetry.rules import run_rules


def phases(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds per phase of one detection (the same steps `find_symmetries` runs, timed one by one)."""
    out: dict[str, float] = {}
    with detect._gc_paused():
        t0 = time.perf_counter()
        cap = capture(model, x)
        t1 = time.perf_counter()
        a = run_rules(cap)
        t2 = time.perf_counter()
        detect._channel_groups(a, {})
        t3 = time.perf_counter()
        detect._translation_groups(a)
        t4 = time.perf_counter()
    out.update(capture=t1 - t0, rules=t2 - t1, channel_groups=t3 - t2, translation_groups=t4 - t3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), input {args.batch}x3x{args.size}x{args.size}")
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name).train()
        with torch.no_grad():  # ViT's head is zero-initialised: constant logits would make certification vacuous
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
        x = torch.randn(args.batch, 3, args.size, args.size)
        t = time.perf_counter()
        s = detect.find_symmetries(model, x)
        first = time.perf_counter() - t
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            s = detect.find_symmetries(model, x)
            times.append(time.perf_counter() - t)
        split = phases(model, x)
        t = time.perf_counter()
        report = certify(model, s, x, sample=args.sample)
        cert = time.perf_counter() - t
        c = s.counts()
        print(f"{name}: {len(s)} groups (translation {c['translation']}, scale {c['scale']}, rescale {c['rescale']}), "
              f"capture {s.meta['capture']}")
        print(f"  detection: median {statistics.median(times):.2f} s over {args.repeats} (first call {first:.2f} s)"
              f"  [target <= 2 s: {'met' if statistics.median(times) <= 2 else 'NOT met'}]")
        print("  phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))
        print(f"  certification: {cert:.2f} s ({len(report.all_at_once)} compositions + {len(report.results)} "
              f"single groups, float64), {'all passed' if report.ok else 'FAILED'}; worst "
              f"{max((r.rel_loss_change for r in report.all_at_once), default=0.0):.1e} relative loss change")


if __name__ == "__main__":
    main()
