"""Detection time for resnet50 and vit_b_16 on CPU against one training step (target: detection <= 1x one
forward+backward of the same model on the same batch), and certification time.

    .venv/bin/python benchmarks/detection_speed.py [--models resnet50 vit_b_16] [--size 224] [--batch 2]
                                                    [--repeats 3] [--threads 1] [--sample 8]
                                                    [--no-certify]

For each model (torchvision, random weights, train mode, 1000 classes), a batch of `--batch` images of
`--size` x `--size`: one forward+backward (cross-entropy on random labels) and `find_symmetries` are timed
`--repeats` times each, interleaved round by round so that machine drift hits both alike, after one untimed
call of each (the first detection pays one-off imports and dispatcher warm-up and is reported separately).
The ratio of the medians, detection / forward+backward, is the figure against the target (<= 1x); both sides are
timed alike (`timed`: a full collection before each call, the young-generation pass after it inside the timer, the
result freed outside). Then the
detection split into its phases (graph capture, op rules, channel groups, translation groups, coverage, the
garbage collector's pass at the end of the pause), and `certify`
once (float64 copy, all groups at once per kind plus `--sample` single groups per kind). Times are wall-clock
seconds on this process's threads; on a shared machine run it when the cores are idle (`uptime`), other load
inflates every number (the ratio less so: both sides are measured in the same rounds).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from neural_mechanics.symmetry import assembly, detect
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
        groups = assembly.channel_groups(a, {})
        t3 = time.perf_counter()
        groups += assembly.translation_groups(a)
        t4 = time.perf_counter()
        detect._coverage(a, groups, model)
        t5 = time.perf_counter()
        del a, cap
        gc.collect(0)  # what the end of the pause costs: one generation-0 pass over the new group objects
        t6 = time.perf_counter()
        del groups
    out.update(capture=t1 - t0, rules=t2 - t1, channel_groups=t3 - t2, translation_groups=t4 - t3,
               coverage=t5 - t4, gc_after=t6 - t5)
    return out


def timed(f: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call of f, then the collector's young-generation pass.

    As timeit does, the collector's deferred full passes are kept out of the call that happens to trigger them: a
    full collection runs before the timer starts (`gc.collect()`), so each call starts from the same heap. What a
    call allocates is in the timer, and so is the generation-0 pass over it (`gc.collect(0)`, for detection the
    pass its paused collector owes); its result is freed after the timer stops (freeing is not detection).
    The full pass that the new objects will cost the program later is printed apart (`full_gc_after`)."""
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    result = f()
    gc.collect(0)
    elapsed = time.perf_counter() - t, time.process_time() - c
    del result
    return elapsed


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One forward+backward (cross-entropy) from cleared gradients."""
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet50", "vit_b_16"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sample", type=int, default=8)
    ap.add_argument("--no-certify", action="store_true", help="skip the certification timing")
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
        y = torch.randint(0, 1000, (args.batch,))
        t = time.perf_counter()
        s = detect.find_symmetries(model, x)
        first = time.perf_counter() - t
        train_step(model, x, y)  # warm-up
        times, steps = [], []
        for _ in range(args.repeats):
            steps.append(timed(lambda: train_step(model, x, y)))  # noqa: B023 (called at once)
            times.append(timed(lambda: detect.find_symmetries(model, x)))  # noqa: B023
        model.zero_grad(set_to_none=True)
        det, step = (statistics.median(t[0] for t in times), statistics.median(t[0] for t in steps))
        det_cpu, step_cpu = (statistics.median(t[1] for t in times), statistics.median(t[1] for t in steps))
        split = phases(model, x)
        gc.collect(0)
        t = time.perf_counter()
        gc.collect()
        split["full_gc_after"] = time.perf_counter() - t  # one full pass with the result alive (paid once, later)
        c = s.counts()
        print(f"{name}: {len(s)} groups (translation {c['translation']}, scale {c['scale']}, rescale {c['rescale']}), "
              f"capture {s.meta['capture']}")
        print(f"  detection: median {det:.2f} s over {args.repeats} (first call {first:.2f} s); forward+backward: "
              f"median {step:.2f} s; ratio {det / step:.2f}x  [target <= 1x: {'met' if det <= step else 'NOT met'}]; "
              f"CPU time ratio {det_cpu / step_cpu:.2f}x ({det_cpu:.2f} / {step_cpu:.2f} s: steadier under load)")
        print("  phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in split.items()))
        if args.no_certify:
            continue
        t = time.perf_counter()
        report = certify(model, s, x, sample=args.sample)
        cert = time.perf_counter() - t
        print(f"  certification: {cert:.2f} s ({len(report.all_at_once)} compositions + {len(report.results)} "
              f"single groups, float64), {'all passed' if report.ok else 'FAILED'}; worst "
              f"{max((r.rel_loss_change for r in report.all_at_once), default=0.0):.1e} relative loss change")


if __name__ == "__main__":
    main()
