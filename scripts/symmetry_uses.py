"""The numbers in the README's "Putting the symmetries to work" section (single-threaded, CPU, ~10 minutes).

Usage: .venv/bin/python scripts/symmetry_uses.py [--only groups,balance,equalize,distance,completeness]

- groups: the certified split of the paper's VGG-16-BN, torchvision resnet18 and vit_b_16 and a small LLaMA-style
  decoder (tests/uses_support.Llama), and how many parameters each recipe (timm, nanoGPT, per-row) gets wrong.
- balance: the paper's VGG-16 (no BN, random init): imbalance, |theta|^2, sweeps, output change.
- equalize: int8 per-tensor weight quantisation before / after cross-layer equalisation of
  * torchvision resnet18, trained briefly on scikit-learn's digits (upsampled to 3 x 32 x 32, 300 SGD steps),
    eval mode with BatchNorm folded into the convolutions;
  * a small pre-LN transformer (digits rows as 8 tokens, 2 layers, width 64, ReLU MLP), trained briefly;
  trained because per-channel ranges only spread once training and BatchNorm statistics have acted; at random
  init they are nearly uniform and there is little to equalise. Reported: relative output error of the quantised
  model, top-1 agreement with the float model and test accuracy.
- distance: the digits VGG-BN at two checkpoints of one run, and a checkpoint against a randomly group-transformed
  copy of itself.
- completeness: the hand-derived architectures of tests/test_uses_completeness.py and a 2k-parameter BN MLP.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import neural_mechanics as nm  # noqa: E402
from neural_mechanics.experiments.models import get_preset  # noqa: E402
from neural_mechanics.uses.balance import balance_params, imbalance  # noqa: E402
from neural_mechanics.uses.equalize import channel_ranges, equalize_params  # noqa: E402
from neural_mechanics.uses.heuristics import RULES, disagreements  # noqa: E402
from neural_mechanics.uses.orbits import float64_params, write_back  # noqa: E402
from neural_mechanics.uses.quantize import fold_batchnorm, quantization_error, quantize_weights  # noqa: E402
from neural_mechanics.uses.transforms import function_change  # noqa: E402
from uses_support import Llama, quantile_biases  # noqa: E402

torch.set_num_threads(1)


def digits(size: int | None = None, channels: int = 1) -> tuple[torch.Tensor, ...]:
    """Train / test split of scikit-learn's digits in [0, 1]; optionally upsampled and repeated over channels."""
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(bunch.target)
    if size is not None:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    x = x.repeat(1, channels, 1, 1)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, opt: torch.optim.Optimizer) -> None:
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def certified(model: nn.Module, x) -> nm.SymmetrySet:
    sym = nm.find_symmetries(model, x)
    report = nm.certify(model, sym, x)
    assert report.ok, report.summary()
    return sym


# ---- sections --------------------------------------------------------------------------------------------


def groups() -> None:
    print("## param groups (tensors / entries in scale_invariant, other; disagreements per rule)")
    vit = torchvision.models.vit_b_16(num_classes=10)
    nn.init.normal_(vit.heads.head.weight, std=0.01)
    cases = [
        ("vgg16-bn-tinyimagenet", get_preset("vgg16-bn-tinyimagenet").build(), torch.randn(2, 3, 64, 64)),
        ("torchvision resnet18", torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 64, 64)),
        ("torchvision vit_b_16", vit, torch.randn(2, 3, 224, 224)),
        ("LLaMA-style (tests/uses_support.py)", Llama(), torch.randint(0, 17, (2, 6))),
    ]
    for name, model, x in cases:
        model.train()
        t0 = time.perf_counter()
        sym = nm.find_symmetries(model, x)
        split = nm.classify_parameters(model, sym)
        pgs = nm.param_groups(model, sym, weight_decay=5e-4)
        dt = time.perf_counter() - t0
        cells = [f"{len(g['params'])} / {sum(p.numel() for p in g['params']):,}" for g in pgs]
        units = sorted({p.unit for p in split.params if p.scale_invariant})
        diffs = disagreements(split)
        counts = ", ".join(f"{r}: {sum(d.rule == r for d in diffs)}" for r in RULES)
        print(f"| {name} | {cells[0]} | {cells[1]} | {', '.join(units) or '-'} | {counts} | {dt:.1f} s |")


def balance() -> None:
    print("## balance: the paper's VGG-16 without BN, random init")
    model = get_preset("vgg16-tinyimagenet").build().train()
    x = torch.randn(4, 3, 64, 64)
    sym = certified(model, x)
    before = imbalance(model, sym)
    params = float64_params(model)
    sq0 = sum(float((p**2).sum()) for p in params.values())
    t0 = time.perf_counter()
    result = balance_params(params, sym)
    dt = time.perf_counter() - t0
    sq1 = sum(float((p**2).sum()) for p in params.values())
    out = get_preset("vgg16-tinyimagenet").build().train()
    out.load_state_dict(model.state_dict())
    write_back(out, params, params)
    print(f"rescale groups {len(before)}, largest |R|/(N1+N2) {max(before.values()):.3g} -> {result.residual:.2g} "
          f"(float64 iterate) in {result.sweeps} sweeps, {dt:.0f} s; |theta|^2 {sq0:.6g} -> {sq1:.6g}; "
          f"float32 model after cast: {max(imbalance(out, sym).values()):.2g}; "
          f"output change {function_change(model, out, x):.2g}")


def _equalize_report(label: str, model: nn.Module, x_cal: torch.Tensor, x_test: torch.Tensor,
                     y_test: torch.Tensor) -> None:
    sym = certified(model, x_cal)
    eq_model = nm.equalize(model, sym)
    params = float64_params(model)
    result = equalize_params(params, sym)
    change = function_change(model, eq_model, x_test)
    spread = [abs(math.log(a / b)) for a, b in channel_ranges(model, sym).values() if a > 0 and b > 0]
    print(f"{label}: {len(sym.filter('rescale'))} rescale groups, {result.equalized} equalised in {result.sweeps} "
          f"sweeps, {len(result.skipped)} left alone; before, median |log r1/r2| {sorted(spread)[len(spread) // 2]:.2f}"
          f" (max {max(spread):.2f}); float output change {change:.2g}")
    for bits in (8, 6, 4):
        for name, m in (("before", model), ("after", eq_model)):
            q = quantization_error(m, x_test, bits)
            acc = accuracy(quantize_weights(m, bits), x_test, y_test)
            print(f"| {label} | int{bits} | {name} | {q.output_error:.4f} | {q.agreement:.3f} | {acc:.3f} "
                  f"(float {accuracy(m, x_test, y_test):.3f}) |")


class DigitsTransformer(nn.Module):
    """8 rows of an 8x8 digit as 8 tokens of 8 pixels; a 2-layer pre-LN encoder, mean-pooled, linear head."""

    def __init__(self, d: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.encoder = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, activation="relu",
                                                                batch_first=True, norm_first=True)
                                     for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x[:, 0]) + self.pos
        for layer in self.encoder:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def equalize(cache: Path | None = None) -> None:
    print("## equalize: | model | bits | | relative output error | top-1 agreement | test accuracy quantised (float) |")
    xtr, ytr, xte, yte = digits(size=32, channels=3)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    saved = None if cache is None else cache / "resnet18-digits.pt"
    if saved is not None and saved.exists():
        net.load_state_dict(torch.load(saved, weights_only=True))
    else:
        t0 = time.perf_counter()
        train(net, xtr, ytr, 300, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4))
        print(f"resnet18 trained 300 steps in {time.perf_counter() - t0:.0f} s")
        if saved is not None:
            torch.save(net.state_dict(), saved)
    folded = fold_batchnorm(net.eval())
    _equalize_report("resnet18 (BN folded)", folded, xtr[:32], xte, yte)
    xtr, ytr, xte, yte = digits()
    torch.manual_seed(0)
    tf = DigitsTransformer()
    train(tf, xtr, ytr, 300, torch.optim.Adam(tf.parameters(), lr=1e-3))
    _equalize_report("pre-LN transformer", tf.eval(), xtr[:32], xte, yte)


def distance() -> None:
    print("## distance up to symmetry: digits VGG-BN")
    xtr, ytr, _, _ = digits()
    torch.manual_seed(0)
    model = get_preset("digits-vgg-bn").build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, xtr, ytr, 100, opt)
    a = get_preset("digits-vgg-bn").build()
    a.load_state_dict(model.state_dict())
    train(model, xtr, ytr, 100, opt)
    b = model.train()
    a.train()
    sym = certified(a, xtr[:16])
    gen = torch.Generator().manual_seed(2)
    factors = [float(torch.randn((), generator=gen)) if s.kind == "translation"
               else math.exp(float(torch.randn((), generator=gen))) for s in sym]
    moved = nm.act(a, sym, factors)
    for label, other in (("step 100 vs its random group transform", moved), ("step 100 vs step 200", b)):
        t0 = time.perf_counter()
        al = nm.distance_up_to_symmetry(a, other, sym)
        dt = time.perf_counter() - t0
        print(f"| {label} | {al.plain_distance:.4g} | {al.distance:.3g} | {al.sweeps} | {dt:.1f} s"
              f" | {function_change(a, al.aligned, xtr[:64]):.1g} |")


def completeness() -> None:
    print("## completeness: | model | parameters | found k of n | gap | time |")
    torch.manual_seed(0)
    x4 = torch.randn(128, 4, generator=torch.Generator().manual_seed(1))
    relu = quantile_biases(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), x4)
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5, bias=False),
                       nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    torch.manual_seed(0)
    bn_bias = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.BatchNorm1d(5),
                            nn.ReLU(), nn.Linear(5, 3))
    xc = torch.randn(64, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    conv = quantile_biases(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                         nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                         nn.Flatten(), nn.Linear(4, 5)), xc)
    torch.manual_seed(0)
    linlin = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4))
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(16, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32, bias=False),
                        nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
    cases = [("ReLU MLP 4-6-5-3", relu, x4), ("BN MLP 4-6-5-3 (no bias before BN)", bn, x4),
             ("BN MLP 4-6-5-3 (bias before BN)", bn_bias, x4), ("conv net 2-3-4 + max pool", conv, xc),
             ("Linear(5,3) -> Linear(3,4)", linlin, torch.randn(64, 5, generator=torch.Generator().manual_seed(4))),
             ("BN MLP 16-32-32-10", big, torch.randn(300, 16, generator=torch.Generator().manual_seed(5)))]
    for name, model, x in cases:
        sym = certified(model, x)
        t0 = time.perf_counter()
        c = nm.completeness(model, x, sym)
        top = ", ".join(f"{n} {m:.1f}" for n, m in sorted(c.unexplained_by_parameter.items(), key=lambda kv: -kv[1])
                        if m >= 0.05)
        print(f"| {name} | {c.n_params} | {c.found} of {c.total} | {c.gap:.0e} | {time.perf_counter() - t0:.1f} s |"
              f" {top} |")


SECTIONS = {"groups": groups, "balance": balance, "equalize": equalize, "distance": distance,
            "completeness": completeness}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--cache", type=Path, default=None, help="directory to keep the trained resnet18 in")
    args = parser.parse_args()
    for section in args.only.split(","):
        name = section.strip()
        SECTIONS[name](args.cache) if name == "equalize" else SECTIONS[name]()
