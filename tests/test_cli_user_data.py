"""`nmech` on what users bring, as a user types it: their own package (models and a dataset factory) in the current
directory, an image-folder tree, per-pixel and token models, token inputs from the command line, the language-model
config, and the errors a wrong pairing of model and data gives.

Most commands run in-process through the console-script entry point (`cli.main`, as tests/test_cli.py does); the
two that are about how `nmech` is started (importing a package from the current directory, the log lines torch
prints before an error) run the installed `nmech` script in a subprocess. Group counts are derived by hand from the
architectures written here (see each test's comments), never taken from the detector.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import neural_mechanics
from neural_mechanics import SymmetrySet, open_run
from test_cli import run as nmech  # `nmech ARGS` in-process through the entry point: (code, stdout, stderr)

torch.set_num_threads(1)

W = 4  # the U-Net's width
MODELS = textwrap.dedent(
    f"""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class UNet(nn.Module):
        # encoder conv-BN-ReLU (w), pool, conv-BN-ReLU (2w), transposed conv up (w), concat with the first stage's
        # features (skip connection), conv-BN-ReLU (w), 1x1 head: per-pixel logits (N, classes, H, W)
        def __init__(self, num_classes=3, in_channels=3, width={W}):
            super().__init__()
            self.input_shape = (in_channels, 8, 8)
            self.enc1 = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.enc2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU())
            self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
            self.dec = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.head = nn.Conv2d(width, num_classes, 1)

        def forward(self, x):
            e1 = self.enc1(x)
            e2 = self.enc2(F.max_pool2d(e1, 2))
            return self.head(self.dec(torch.cat([self.up(e2), e1], 1)))

    def unet(num_classes=3):
        return UNet(num_classes)

    class TokenMLP(nn.Module):
        # token ids -> embedding (d) -> LayerNorm -> Linear(d, h) -> ReLU -> Linear(h, vocab): next-token logits
        def __init__(self, vocab=50, d=8, h=12):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.norm = nn.LayerNorm(d)
            self.fc = nn.Linear(d, h)
            self.out = nn.Linear(h, vocab)

        def forward(self, tokens):
            return self.out(torch.relu(self.fc(self.norm(self.emb(tokens)))))

    def lm():
        return TokenMLP()
    """
)
DATA = textwrap.dedent(
    """
    import torch
    from torch.utils.data import Dataset

    class Patterns(Dataset):
        # 64-dim Gaussian class patterns: x = mu_y + noise, 4 classes
        num_classes = 4

        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            mu = torch.randn(4, 64, generator=torch.Generator().manual_seed(99))
            self.y = torch.arange(n) % 4
            self.x = mu[self.y] + 0.5 * torch.randn(n, 64, generator=g)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    def patterns(seed=0):
        return Patterns(96, seed), Patterns(32, seed + 1)
    """
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project: package `nmuser_<n>` (models.py, data.py) in the current directory, which is not on sys.path
    otherwise (as under the `nmech` script); imports are undone afterwards."""
    pkg = f"nmuser_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "models.py").write_text(MODELS)
    (tmp_path / pkg / "data.py").write_text(DATA)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield pkg
    for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[name]


def write_config(path: Path, **sections) -> Path:
    base = {"name": path.stem, "batch_size": 8, "steps": 4, "device": "cpu", "eval_every": 0,
            "tracker": {"log_every": 2}, "run_dir": str(path.parent / "run")}
    path.write_text(yaml.safe_dump({**base, **sections}))
    return path


def tracked_kinds(run_dir: Path) -> Counter:
    frame = open_run(run_dir).frame()
    return Counter(frame.drop_duplicates("group")["kind"])


# -- your data -------------------------------------------------------------------------------------------------


def test_an_image_folder_tree_trains_and_reports(project, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("circle", "square", "star")):  # 3 classes x 8 greyscale 8x8 images, class-dependent
        for j in range(8):
            img = np.clip(rng.normal(60 + 60 * k, 30, (8, 8)), 0, 255).astype(np.uint8)
            path = tmp_path / "shapes" / cls / f"{j}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
    cfg = write_config(tmp_path / "folder.yaml", model="digits-vgg-bn",
                       dataset={"name": "imagefolder", "root": str(tmp_path / "shapes"), "channels": 1,
                                "test_fraction": 0.25})
    code, _, err = nmech(monkeypatch, capsys, "train", str(cfg))
    assert code == 0, err
    code, _, err = nmech(monkeypatch, capsys, "report", str(tmp_path / "run"))
    assert code == 0 and (tmp_path / "run" / "report.html").is_file(), err
    run = open_run(tmp_path / "run")
    metrics = run.metrics()
    test_rows = metrics[(metrics["split"] == "test") & (metrics["name"] == "accuracy")]
    assert len(test_rows) == 1 and 0.0 <= float(test_rows["value"].iloc[0]) <= 1.0
    assert any("imagefolder" in n and "18 train images, 3 classes" in n for n in run.manifest["notes"])
    # the digits VGG built with the folder's 3 classes: its head's translation groups are the 64 hidden columns + bias
    kinds = tracked_kinds(tmp_path / "run")
    assert kinds["translation"] == 64 + 1 and kinds["scale"] > 0 and kinds["rescale"] > 0


def test_a_factory_dataset_from_the_current_directory_trains_and_reports(project, tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "factory.yaml", model="mlp-bn", dataset={"name": f"{project}.data:patterns"})
    code, _, err = nmech(monkeypatch, capsys, "train", str(cfg))
    assert code == 0, err
    code, _, err = nmech(monkeypatch, capsys, "report", str(tmp_path / "run"))
    assert code == 0, err
    run = open_run(tmp_path / "run")
    assert {"train", "test"} <= set(run.metrics()["split"])
    # mlp-bn 64-128-128-K, K = 4 from the dataset's num_classes: translation = the head's 128 columns + bias
    kinds = tracked_kinds(tmp_path / "run")
    assert kinds["translation"] == 129 and kinds["scale"] == 256 and kinds["rescale"] == 256


# -- per-pixel outputs -----------------------------------------------------------------------------------------


def test_a_unet_through_check_and_train(project, tmp_path, monkeypatch, capsys):
    # By hand, width w: scale = convs feeding a BatchNorm: w + 2w + w = 4w. rescale = BN affine channels read by the
    # next convs through ReLU (enc1: w, read by enc2 and, through the skip, by dec; enc2: 2w, read by the transposed
    # conv; dec: w, read by the head) + the transposed conv's w output channels read by dec: 5w. translation = the
    # per-pixel softmax over classes: the head's w input columns + its bias: w + 1.
    csv = tmp_path / "c.csv"
    code, out, err = nmech(monkeypatch, capsys, "check", f"{project}.models:unet", "--csv", str(csv))
    assert code == 0, err + out
    assert "all constraints hold" in out
    df = pd.read_csv(csv)
    assert dict(Counter(df["kind"])) == {"scale": 4 * W, "rescale": 5 * W, "translation": W + 1}
    assert (df["grad_rel"] <= 1e-6).all() and df["grad_rel_random"].median() > 1e-4

    cfg = write_config(tmp_path / "seg.yaml", model=f"{project}.models:unet",
                       dataset={"name": "synthetic", "targets": "pixel", "input_shape": [3, 8, 8], "num_classes": 3,
                                "num_samples": 32})
    code, out, err = nmech(monkeypatch, capsys, "train", str(cfg))
    assert code == 0, err
    metrics = open_run(tmp_path / "run").metrics()
    acc = metrics[(metrics["split"] == "test") & (metrics["name"] == "accuracy")]["value"]
    assert len(acc) == 1 and 0.0 <= float(acc.iloc[0]) <= 1.0  # pixel accuracy: correct pixels / all pixels
    assert tracked_kinds(tmp_path / "run") == Counter({"scale": 4 * W, "rescale": 5 * W, "translation": W + 1})


# -- token models ----------------------------------------------------------------------------------------------


def test_a_token_model_through_symmetries_check_and_train(project, tmp_path, monkeypatch, capsys):
    # TokenMLP(vocab 50, d 8, h 12) under next-token cross-entropy, by hand: translation = the output layer's 12
    # input columns + its bias (softmax over the vocabulary) = 13; scale = the embedding, read only by the LayerNorm
    # = 1; rescale = LayerNorm affine coordinate j with fc's column j (8) + fc row i with out's column i through
    # the ReLU (12) = 20.
    spec = f"{project}.models:lm"
    token_args = ["--input-shape", "16", "--input-dtype", "long", "--vocab", "50", "--loss", "next_token"]
    code, out, err = nmech(monkeypatch, capsys, "symmetries", spec, *token_args, "--json")
    assert code == 0, err
    found = SymmetrySet.from_json(out)
    assert found.counts() == {"translation": 13, "scale": 1, "rescale": 20}
    code, out, err = nmech(monkeypatch, capsys, "symmetries", spec, *token_args)
    assert code == 0 and "all actions leave the loss unchanged" in out, err
    # without --loss, cross_entropy takes the vocabulary (last) axis of the token logits: the same 13 translations;
    # the sequence axis (an explicit --class-dim 1) would give none
    code, out, err = nmech(monkeypatch, capsys, "symmetries", spec, *token_args[:-2], "--json")
    assert code == 0 and SymmetrySet.from_json(out).counts() == found.counts(), err
    code, out, err = nmech(monkeypatch, capsys, "symmetries", spec, *token_args[:-2], "--class-dim", "1", "--json")
    assert code == 0 and SymmetrySet.from_json(out).counts()["translation"] == 0, err
    code, out, err = nmech(monkeypatch, capsys, "check", spec, *token_args)
    assert code == 0 and "all constraints hold" in out, err + out

    cfg = write_config(tmp_path / "lm.yaml", model=spec, loss="next_token",
                       dataset={"name": "synthetic", "dtype": "long", "targets": "next_token", "input_shape": [16],
                                "vocab_size": 50, "num_samples": 64})
    code, out, err = nmech(monkeypatch, capsys, "train", str(cfg))
    assert code == 0, err
    assert tracked_kinds(tmp_path / "run") == Counter({"translation": 13, "scale": 1, "rescale": 20})


def test_token_inputs_need_a_length_and_a_vocabulary(project, monkeypatch, capsys):
    spec = f"{project}.models:lm"
    code, _, err = nmech(monkeypatch, capsys, "symmetries", spec)
    assert code == 2 and "how many per example" in err and "--input-shape 16" in err
    code, _, err = nmech(monkeypatch, capsys, "symmetries", f"{project}.models:unet", "--input-dtype", "long")
    assert code == 2 and "--vocab" in err
    code, _, err = nmech(monkeypatch, capsys, "symmetries", spec, "--input-shape", "16", "--input-dtype", "int8")
    assert code == 2 and "unknown input dtype" in err
    code, _, err = nmech(monkeypatch, capsys, "symmetries", spec, "--input-shape", "16", "--vocab", "50",
                         "--input-dtype", "float32")
    assert code == 2 and "asks for token ids" in err


# -- wrong pairings are clear errors (exit 2), never tracebacks --------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        ({"model": "digits-vgg-bn", "dataset": {"name": "synthetic", "targets": "pixel", "input_shape": [1, 8, 8],
                                                "num_classes": 3, "num_samples": 16}},
         ["outputs (8, 3)", "(8, 8, 8)", "per-pixel model"]),
        ({"model": "digits-vgg-bn", "loss": "mse"}, ["class labels", "cross_entropy"]),
        ({"model": "llama-tiny", "dataset": {"name": "tokens", "seq_len": 16}},
         ["token logits", "next_token"]),
        ({"model": "llama-tiny", "dataset": {"name": "synthetic", "input_shape": [1, 8, 8], "num_samples": 16}},
         ["cannot run on the data", "(8, 1, 8, 8)", "torch.float32"]),
    ],
    ids=["pixel-targets-classifier", "mse-on-labels", "lm-without-next-token", "model-rejects-data"],
)
def test_a_wrong_pairing_of_model_and_data_is_a_clear_error(tmp_path, monkeypatch, capsys, overrides, needles):
    cfg = write_config(tmp_path / "bad.yaml", **overrides)
    code, out, err = nmech(monkeypatch, capsys, "train", str(cfg))
    assert code == 2, (out, err)
    assert "Traceback" not in err and "what to do" in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "run" / "groups").exists()  # nothing was trained


# -- how nmech is started ------------------------------------------------------------------------------------------


def _nmech_script(tmp_path: Path) -> list[str]:
    """The installed console script, or (not installed) a copy of what pip writes for it: `sys.path[0]` is then
    the script's directory, not the current one, exactly as for the real script."""
    script = Path(sys.executable).parent / "nmech"
    if not script.is_file():
        script = tmp_path / "bin" / "nmech"
        script.parent.mkdir()
        script.write_text("import sys\nfrom neural_mechanics.cli import main\nsys.exit(main())\n")
    return [sys.executable, str(script)]


def test_the_nmech_script_imports_a_package_from_the_current_directory(project, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(neural_mechanics.__file__).parents[1])}
    proc = subprocess.run([*_nmech_script(tmp_path), "symmetries", f"{project}.models:unet", "--json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert SymmetrySet.from_json(proc.stdout).counts() == {"translation": W + 1, "scale": 4 * W, "rescale": 5 * W}
    # a model that rejects its example input: one clean error, none of torch's fake-tensor log lines before it
    proc = subprocess.run([*_nmech_script(tmp_path), "symmetries", f"{project}.models:unet", "--input-shape", "3,7,7"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "fake_tensor" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "what to do" in proc.stderr


# -- a language model end to end ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_on_the_embedded_corpus_with_adamw_tracks_every_kind_and_reports_its_predictions(
        tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "lm"
    code, out, err = nmech(monkeypatch, capsys, "train", "llama-tiny-corpus-adamw", "--set", "steps=12",
                           "--set", "eval_every=0", "--set", "device=cpu", "--run-dir", str(run_dir))
    assert code == 0, err
    # llama-tiny (width 48, SwiGLU hidden 128, 2 blocks, byte vocabulary, no biases), by hand: translation = the
    # head's 48 input columns; scale = 1 (the residual stream: embedding, each o_proj and down_proj, read only by
    # RMSNorms); rescale per block = attn_norm (48) + value/o_proj channels (48) + mlp_norm (48) + up/down (128),
    # plus the final norm with the head (48), plus the rotary query/key pairs: each head (4, of size 12) pairs query
    # rows {c, c + 6} with key rows {c, c + 6} jointly (the rotation mixes them): 6 per head, 24 per block:
    # 2 * (272 + 24) + 48 = 640.
    assert tracked_kinds(run_dir) == Counter({"translation": 48, "scale": 1, "rescale": 640})
    code, out, err = nmech(monkeypatch, capsys, "report", str(run_dir))
    assert code == 0, err
    assert "no predictions for this run" not in out  # AdamW's strategy (issue 14): the exact step identity
    html = (run_dir / "report.html").read_text()
    assert "No predictions for this run" not in html
    assert "adaptive preconditioner breaks the conservation law" in html  # why the exact recurrence is missing
    assert "exact step identity" in html and "Equilibrium predictions per layer" in html
    frame = open_run(run_dir).frame()
    assert frame.loc[frame["valid"], "predicted_breaking"].notna().all()
    for kind in ("translation", "scale", "rescale"):
        assert f"{kind}</td><td class='num'>" in html  # a row per kind in the symmetry summary
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert any("embedded corpus" in n and "sha256" in n for n in manifest["notes"])
    assert manifest["config"]["loss"]["name"] == "next_token"


def test_help_of_the_new_options(monkeypatch, capsys):
    for command in ("symmetries", "check"):
        code, out, _ = nmech(monkeypatch, capsys, command, "--help")
        assert code == 0 and "<bool>" not in out
        for option in ("--input-dtype", "--vocab", "--loss", "--class-dim", "next_token"):
            assert option in out, (command, option)
    code, out, _ = nmech(monkeypatch, capsys, "train", "--help")
    assert "imagefolder" in out and "package.module:factory" in out and "<bool>" not in out
