"""GPU readiness of the tracker, in one go (<= 5 minutes on one GPU; exits 2 without CUDA).

    .venv/bin/python benchmarks/gpu_check.py [--quick]

Three checks, on the workloads of `WORKLOADS` (the paper's VGG-16-BN at batch 256 on 64x64 inputs with SGD +
momentum + weight decay in fp32; a small LLaMA-style model with AdamW under bf16 autocast; random inputs, no
dataset):

1. host synchronisation: the tracked steps run under `torch.cuda.set_sync_debug_mode("error")` inside the
   tracker's hooks, except on log steps (which move one batch of rows to the host, so they may sync); a
   dispatch mode (`SyncDetector`) also records every op that needs the host (item/bool of a tensor, nonzero,
   tensors built from Python data, copies to the host) inside the hooks of every step. Any finding outside log
   steps fails the script (exit 1); the most flagged ops in one log step are printed (not failed on);
2. step time: tracked / untracked, both models built from the same seed, timed with CUDA events over rounds that
   alternate the two (warm-up first, medians per step; the tracker logs every 10 steps);
3. the predictions' errors: a short SGD run of a small BN network (`digits-vgg-bn`, random 8x8 inputs) on the CPU
   and on the GPU from the same state and batches, max over rows of |prediction - measured| / group norm for
   every prediction column, side by side.

Everything but the CUDA clock and the CUDA sync mode runs on a CPU too (tests/test_gpu_check.py runs the
pieces: model builders, `SyncDetector` and `check_host_syncs` on the CPU, the timing harness with `CpuClock`,
the error table, the report).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import neural_mechanics as nm
from neural_mechanics.experiments.llama import tiny_llama
from neural_mechanics.experiments.models import get_preset, vgg
from neural_mechanics.experiments.objectives import Objective, build_objective
from neural_mechanics.tracking.tracker import Tracker

PREDICTIONS = ("predicted_exact", "predicted_breaking", "predicted_paper")
aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default,
            aten.lift_fresh.default, aten.masked_select.default, aten._unique2.default}
"""Ops whose result needs the host to wait for the device: a scalar read (item, float, bool, Python `if` on a
tensor), a data-dependent output size, or a tensor built from Python data (lift_fresh: a host-to-device copy)."""


# -- workloads --------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A model, one batch (x, y), its objective and its optimizer: what one tracked/untracked step trains."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    objective: Objective
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    autocast: torch.dtype | None = None
    symmetries: Any = field(default=None, repr=False)

    def to(self, device: torch.device) -> Workload:
        return Workload(self.name, copy.deepcopy(self.model).to(device), self.x.to(device), self.y.to(device),
                        self.objective, self.make_optimizer, self.autocast, self.symmetries)

    def step_fn(self, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
        """One ordinary training step (zero_grad, forward under autocast if set, backward, optimizer.step)."""
        dev = self.x.device.type

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
                loss = self.objective.loss(self.model(self.x), self.y)
            loss.backward()
            optimizer.step()

        return step


def vgg16_bn_workload(batch: int = 256, size: int = 64, classes: int = 200, seed: int = 0) -> Workload:
    """The paper's VGG-16-BN (Tiny ImageNet variant), SGD lr 0.1, momentum 0.9, weight decay 5e-4, fp32."""
    torch.manual_seed(seed)
    model = vgg(16, num_classes=classes, input_size=size, batch_norm=True).train()
    return Workload(f"VGG-16-BN b{batch} {size}x{size} SGD", model, torch.randn(batch, 3, size, size),
                    torch.randint(0, classes, (batch,)), build_objective("cross_entropy"),
                    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))


def llama_workload(batch: int = 32, seq: int = 256, dim: int = 512, layers: int = 8, heads: int = 8,
                   vocab: int = 4096, seed: int = 0) -> Workload:
    """A LLaMA-style model (experiments/llama.py: RMSNorm, rotary attention, SwiGLU), AdamW lr 3e-4, betas
    (0.9, 0.95), weight decay 0.1, under bf16 autocast; next-token loss on random tokens."""
    torch.manual_seed(seed)
    model = tiny_llama(num_classes=vocab, dim=dim, layers=layers, heads=heads, hidden=dim * 8 // 3 // 8 * 8,
                       max_positions=seq, seq_len=seq).train()
    return Workload(f"LLaMA d{dim} L{layers} b{batch}x{seq} AdamW bf16", model,
                    torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq)),
                    build_objective("next_token"),
                    lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1),
                    autocast=torch.bfloat16)


def small_bn_workload(batch: int = 64, seed: int = 0) -> Workload:
    """`digits-vgg-bn` (a VGG-shaped BN network for 1x8x8 inputs) on random inputs, SGD + momentum + wd."""
    torch.manual_seed(seed)
    preset = get_preset("digits-vgg-bn")
    return Workload("digits-vgg-bn SGD", preset.build().train(), torch.randn(batch, *preset.input_shape),
                    torch.randint(0, preset.num_classes, (batch,)), build_objective("cross_entropy"),
                    lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))


def detect(w: Workload) -> Workload:
    """Find `w`'s symmetries on two examples of its batch, on the CPU (the model's state is left alone)."""
    model = copy.deepcopy(w.model).cpu()
    w.symmetries = nm.find_symmetries(model, w.x[:2].cpu(), loss=w.objective.spec)
    return w


# -- 1. host synchronisation inside the hooks ----------------------------------------------------------------
class SyncDetector(TorchDispatchMode):
    """Records (step, op) for every op of `SYNC_OPS`, and every copy to the CPU from another device, while on."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[int, str]] = []
        self.step = -1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        to_host = (func in (aten._to_copy.default, aten.copy_.default) and isinstance(args[0], Tensor)
                   and _host_copy(func, args, kwargs, out))
        if func in SYNC_OPS or to_host:
            self.found.append((self.step, str(func)))
        return out


def _host_copy(func: Any, args: Any, kwargs: Any, out: Any) -> bool:
    if func is aten.copy_.default:
        return bool(args[0].device.type == "cpu" and args[1].device.type != "cpu")
    return bool(args[0].device.type != "cpu" and isinstance(out, Tensor) and out.device.type == "cpu")


@contextlib.contextmanager
def hooks_watched(detector: SyncDetector, cuda_errors: bool,
                  log_detector: SyncDetector | None = None) -> Iterator[list[tuple[int, str]]]:
    """Wrap the Tracker's step hooks (class level: for trackers built inside the body) so that outside log steps
    they run under `detector` and, if `cuda_errors`, `torch.cuda.set_sync_debug_mode("error")` (an error is
    recorded as (step, message), not raised); on log steps under `log_detector`, if given (recorded, allowed).
    Yields the list of CUDA errors."""
    errors: list[tuple[int, str]] = []
    originals = Tracker._pre_hook, Tracker._post_hook

    def watched(hook: Callable[..., Any]) -> Callable[..., Any]:
        def run(self: Tracker, *args: Any) -> Any:
            if self._is_log_step(self.step):
                if log_detector is None:
                    return hook(self, *args)
                log_detector.step = self.step
                with log_detector:
                    return hook(self, *args)
            detector.step = self.step
            previous = torch.cuda.get_sync_debug_mode() if cuda_errors else 0
            try:
                with detector:
                    if cuda_errors:
                        torch.cuda.set_sync_debug_mode("error")
                    return hook(self, *args)
            except RuntimeError as exc:
                if not cuda_errors:
                    raise
                errors.append((self.step, str(exc).splitlines()[0]))
                return None
            finally:
                if cuda_errors:
                    torch.cuda.set_sync_debug_mode(previous)

        return run

    Tracker._pre_hook, Tracker._post_hook = watched(originals[0]), watched(originals[1])  # type: ignore[method-assign]
    try:
        yield errors
    finally:
        Tracker._pre_hook, Tracker._post_hook = originals  # type: ignore[method-assign]


def check_host_syncs(w: Workload, steps: int = 12, log_every: int = 5,
                     log_found: list[tuple[int, str]] | None = None) -> list[tuple[int, str]]:
    """Train `steps` tracked steps of `w` (on its device) and return the host syncs found inside the hooks outside
    log steps: distinct (step, op or CUDA error). Empty means the hooks never wait for the device between log
    steps. `log_found`, if given, receives every (step, op) the detector flags on log steps (allowed there)."""
    model = copy.deepcopy(w.model)
    optimizer = w.make_optimizer(model)
    detector, log_detector = SyncDetector(), SyncDetector()
    cuda = w.x.device.type == "cuda"
    with tempfile.TemporaryDirectory() as run_dir, hooks_watched(detector, cuda, log_detector) as errors:
        tracker = Tracker(model, optimizer, w.symmetries, run_dir, log_every=log_every)
        step = _with(w, model).step_fn(optimizer)
        for _ in range(steps):
            step()
        tracker.close()
    if log_found is not None:
        log_found += log_detector.found
    return sorted(set(detector.found) | set(errors))


# -- 2. step time -------------------------------------------------------------------------------------------------
class CpuClock:
    """Host wall clock (perf_counter): what the CPU test and a CPU run use."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, marks: list[Any]) -> list[float]:
        return [b - a for a, b in itertools.pairwise(marks)]


class CudaClock:
    """CUDA events recorded on the current stream between steps; read once per round (one synchronisation)."""

    def mark(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, marks: list[Any]) -> list[float]:
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1000.0 for a, b in itertools.pairwise(marks)]


def time_steps(step: Callable[[], None], n: int, clock: Any) -> list[float]:
    """Seconds of each of `n` calls of `step`, by `clock` (marks between the calls, read at the end)."""
    marks = [clock.mark()]
    for _ in range(n):
        step()
        marks.append(clock.mark())
    return list(clock.seconds(marks))


def compare_steps(steps: dict[str, Callable[[], None]], clock: Any, *, warmup: int = 3, iters: int = 10,
                  rounds: int = 3) -> dict[str, float]:
    """Median seconds per step of each named step function: `warmup` untimed calls each, then `rounds` rounds in
    which every function runs `iters` timed steps in turn (so drift hits all alike)."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            times[k] += time_steps(fn, iters, clock)
    return {k: statistics.median(v) for k, v in times.items()}


def tracked_vs_untracked(w: Workload, clock: Any, *, log_every: int = 10, **timing: int) -> dict[str, float]:
    """Median step time untracked and tracked (two copies of `w`'s model, the tracker logging every `log_every`
    steps to a temp run) and their ratio."""
    plain, tracked = copy.deepcopy(w.model), copy.deepcopy(w.model)
    opt_plain, opt_tracked = w.make_optimizer(plain), w.make_optimizer(tracked)
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = Tracker(tracked, opt_tracked, w.symmetries, run_dir, log_every=log_every)
        med = compare_steps({"untracked": _with(w, plain).step_fn(opt_plain),
                             "tracked": _with(w, tracked).step_fn(opt_tracked)}, clock, **timing)
        tracker.close()
    return {**med, "ratio": med["tracked"] / med["untracked"], "groups": float(len(w.symmetries))}


def _with(w: Workload, model: nn.Module) -> Workload:
    return Workload(w.name, model, w.x, w.y, w.objective, w.make_optimizer, w.autocast, w.symmetries)


# -- 3. prediction errors -----------------------------------------------------------------------------------------
def prediction_errors(w: Workload, steps: int = 40, log_every: int = 5) -> dict[str, float]:
    """Train `steps` tracked steps of `w` on its device (same batch each step) and return, per prediction column,
    max over logged rows of |prediction - measured| / group norm (NaN where a column has no value)."""
    model = copy.deepcopy(w.model)
    optimizer = w.make_optimizer(model)
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = Tracker(model, optimizer, w.symmetries, run_dir, log_every=log_every)
        step = _with(w, model).step_fn(optimizer)
        for _ in range(steps):
            step()
        frame = tracker.frame()
        tracker.close()
    out = {}
    for col in PREDICTIONS:
        err = (np.abs(frame[col] - frame["measured"]) / frame["norm"]).to_numpy()
        out[col] = float(np.nanmax(err)) if np.isfinite(err).any() else float("nan")
    return out


# -- report -------------------------------------------------------------------------------------------------------
def format_table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain text table (first column left-aligned, the others right-aligned; floats as 4 significant digits,
    NaN as "-")."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if v != v else f"{v:.4g}"
        return str(v)

    cells = [header, *[[cell(v) for v in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(r, widths,
                                                                                                strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * wd for wd in widths))
    return "\n".join(lines)


def sync_section(results: dict[str, list[tuple[int, str]]],
                 log_found: dict[str, list[tuple[int, str]]] | None = None) -> str:
    """One row per run: "ok" or the syncs found between log steps; and the most host reads the detector flagged
    in one log step (allowed; one expected on a GPU: the rows' transfer)."""
    rows = []
    for name, found in results.items():
        per_log = collections.Counter(step for step, _ in (log_found or {}).get(name, []))
        rows.append([name, "ok" if not found else f"{len(found)} sync(s): " + "; ".join(
            f"step {s}: {op}" for s, op in found[:3]), max(per_log.values(), default=0)])
    return "host synchronisation inside the hooks (log steps excepted)\n" + format_table(
        ["run", "between log steps", "per log step"], rows)


def timing_section(results: dict[str, dict[str, float]]) -> str:
    rows = [[name, int(r["groups"]), r["untracked"] * 1e3, r["tracked"] * 1e3, r["ratio"]]
            for name, r in results.items()]
    return "step time, median (tracked: log every 10 steps)\n" + format_table(
        ["model", "groups", "untracked ms", "tracked ms", "ratio"], rows)


def errors_section(cpu: dict[str, float], gpu: dict[str, float], name: str) -> str:
    rows = [[col, cpu[col], gpu.get(col, float("nan"))] for col in PREDICTIONS]
    return (f"prediction errors, max |prediction - measured| / group norm ({name})\n"
            + format_table(["prediction", "CPU", "GPU"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller LLaMA and fewer timed steps (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False); this script checks "
              "the tracker on a GPU: run it on a machine with one (the CPU parts are tested by "
              "tests/test_gpu_check.py)", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    llama = llama_workload(dim=256, layers=4, seq=128) if args.quick else llama_workload()
    workloads = [detect(vgg16_bn_workload()).to(dev), detect(llama).to(dev)]
    log_found: dict[str, list[tuple[int, str]]] = {w.name: [] for w in workloads}
    syncs = {w.name: check_host_syncs(w, log_found=log_found[w.name]) for w in workloads}
    print("\n" + sync_section(syncs, log_found))
    timing = {"iters": 5, "rounds": 2} if args.quick else {"iters": 20, "rounds": 3}
    times = {w.name: tracked_vs_untracked(w, CudaClock(), warmup=5, **timing) for w in workloads}
    print("\n" + timing_section(times))
    small = detect(small_bn_workload())
    print("\n" + errors_section(prediction_errors(small), prediction_errors(small.to(dev)), small.name))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 1 if any(syncs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
