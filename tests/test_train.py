"""The training loop: a brute-force reference loop, determinism, resume (bit for bit), run-directory rules, and the
paper's VGG-16-BN config end to end on a generated Tiny ImageNet fixture.

Also holds the small helpers the other training test files import (`tiny_cfg`, `nmech`, `make_tiny_imagenet`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from neural_mechanics.errors import ConfigError, RunStoreError
from neural_mechanics.experiments.checkpoint import config_mismatch, load_checkpoint
from neural_mechanics.experiments.config import TrainConfig, config_to_dict, load_config
from neural_mechanics.experiments.datasets import endless_batches, load_dataset, make_loader
from neural_mechanics.experiments.rundir import CHECKPOINT
from neural_mechanics.experiments.specs import resolve_model
from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.store import open_run

torch.set_num_threads(1)

# ---- helpers shared with test_crash / test_distributed / test_hostile / test_integrations ------------------

TINY = ["model=mlp", "batch_size=32", "steps=40", "tracker.log_every=2", "eval_every=0", "checkpoint_every=10",
        "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.weight_decay=5e-4"]


def tiny_overrides(*extra: str) -> list[str]:
    """The demo config shrunk to seconds: a ReLU MLP on digits with momentum and weight decay."""
    return [*TINY, *extra]


def tiny_cfg(*extra: str) -> TrainConfig:
    return load_config("demo", tiny_overrides(*extra))


def nmech(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the `nmech` console script in-process (cli.main: user errors -> message + exit 2); (code, out, err)."""
    from neural_mechanics import cli

    monkeypatch.setattr(sys, "argv", ["nmech", *args])
    capsys.readouterr()
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = int(e.code or 0) if not isinstance(e.code, str) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    """Exit status 2, a message with 'what to do', and no traceback."""
    assert code == 2, err
    assert "what to do" in err, err
    assert "Traceback" not in err, err
    flat = " ".join(err.split())
    for n in needles:
        assert n in flat, (n, err)


def frames(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    run = open_run(run_dir)
    return run.frame(), run.layers(), run.metrics()


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold identical rows (groups, layers, metrics), bit for bit."""
    for fa, fb in zip(frames(a), frames(b), strict=True):
        pd.testing.assert_frame_equal(fa.reset_index(drop=True), fb.reset_index(drop=True), check_exact=True)


def make_tiny_imagenet(root: Path, wnids: tuple[str, ...] = ("n02", "n01", "n03"), per_class: int = 4,
                       n_val: int = 6) -> Path:
    """A tiny-imagenet-200 directory in its exact layout (64x64 JPEGs): train/<wnid>/images/*.JPEG, val/images +
    val/val_annotations.txt, wnids.txt, words.txt."""
    from PIL import Image

    d = root / "tiny-imagenet-200"
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tclass {w}\n" for w in wnids))
    gen = torch.Generator().manual_seed(0)
    for k, w in enumerate(sorted(wnids)):
        (d / "train" / w / "images").mkdir(parents=True)
        for j in range(per_class):
            rgb = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
            rgb[..., k % 3] = 200
            Image.fromarray(rgb).save(d / "train" / w / "images" / f"{w}_{j}.JPEG", format="JPEG")
        (d / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t63\t63\n")
    lines = []
    for i in range(n_val):
        w = sorted(wnids)[i % len(wnids)]
        rgb = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(rgb).save(d / "val" / "images" / f"val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return d


# ---- the loop against a brute-force reference ---------------------------------------------------------------


def test_loop_equals_a_plain_sgd_loop_and_final_rows_equal_direct_charges(tmp_path):
    """The final model is what a hand-written SGD loop over the same batches gives (the tracker changes nothing),
    and the last logged charge of every group is Symmetry.charge of the final parameters."""
    cfg = tiny_cfg("steps=20", "checkpoint_every=20")
    result = run_training(cfg, run_dir=tmp_path / "run", progress=False)
    assert result.steps == 20 and result.status == "finished"

    torch.manual_seed(cfg.seed)
    train = load_dataset("digits", split="train", seed=cfg.seed)
    model = resolve_model("mlp", num_classes=train.num_classes).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = endless_batches(make_loader(train, 32, seed=cfg.seed, drop_last=True), 0)
    for _ in range(20):
        x, y = next(batches)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    for name, value in model.state_dict().items():
        assert torch.equal(saved["model"][name], value), name

    run = open_run(tmp_path / "run")
    last = run.frame().query("step == 20").set_index("group")
    params = dict(model.named_parameters())
    syms = run.symmetries
    assert len(last) == len(syms) > 0
    for s in list(syms)[:: max(1, len(syms) // 40)]:
        direct = float(s.charge(params))  # float64 reference; the tracker forms products in the parameter dtype
        assert abs(last.loc[s.name, "measured"] - direct) <= 1e-6 * last.loc[s.name, "norm"], s.name
    # the exact prediction holds (rescale/translation under SGD + momentum + weight decay)
    assert result.max_rel_error["exact"] < 1e-5
    m = run.metrics()
    assert set(m["split"]) == {"train", "test"} and (m["step"] <= 20).all()


def test_same_config_twice_gives_identical_frames(tmp_path):
    cfg = tiny_cfg("steps=16", "model=digits-vgg-bn", "tracker.log_every=4", "eval_every=8")
    run_training(cfg, run_dir=tmp_path / "a", progress=False)
    run_training(cfg, run_dir=tmp_path / "b", progress=False)
    assert_same_run(tmp_path / "a", tmp_path / "b")
    assert len(open_run(tmp_path / "a").frame()) > 0


# ---- resume ------------------------------------------------------------------------------------------------


def test_resume_after_stop_equals_uninterrupted_bit_for_bit(tmp_path):
    cfg = tiny_cfg("eval_every=10")
    run_training(cfg, run_dir=tmp_path / "ref", progress=False)
    part = run_training(cfg, run_dir=tmp_path / "res", progress=False, stop_after=13)
    assert part.status == "running" and part.steps == 13
    assert open_run(tmp_path / "res").status == "running"
    done = run_training(cfg, run_dir=tmp_path / "res", resume=True, progress=False)
    assert done.steps == 40 and open_run(tmp_path / "res").status == "finished"
    assert_same_run(tmp_path / "ref", tmp_path / "res")  # metrics logged at the checkpoint step included


def test_resume_from_an_older_checkpoint_drops_the_rows_logged_after_it(tmp_path):
    """Killed after rows up to step 30 were flushed but with the last checkpoint at 10: resume replays 10..40."""
    cfg = tiny_cfg("eval_every=10")
    run_training(cfg, run_dir=tmp_path / "ref", progress=False)
    res = tmp_path / "res"
    run_training(cfg, run_dir=res, progress=False, stop_after=10)
    shutil.copy(res / CHECKPOINT, tmp_path / "ckpt10.pt")
    run_training(cfg, run_dir=res, resume=True, progress=False, stop_after=20)
    assert open_run(res).frame()["step"].max() >= 28
    shutil.copy(tmp_path / "ckpt10.pt", res / CHECKPOINT)
    run_training(cfg, run_dir=res, resume=True, progress=False)
    assert_same_run(tmp_path / "ref", res)
    assert any("resumed at step 10" in n for n in open_run(res).manifest["notes"])


def test_resume_without_checkpoint_restarts_from_zero(tmp_path):
    """A run killed before its first checkpoint: --resume starts over in the same directory, same result."""
    cfg = tiny_cfg("steps=12", "checkpoint_every=0")
    run_training(cfg, run_dir=tmp_path / "ref", progress=False)
    res = tmp_path / "res"
    run_training(cfg, run_dir=res, progress=False, stop_after=7)
    (res / CHECKPOINT).unlink()
    run_training(cfg, run_dir=res, resume=True, progress=False)
    assert_same_run(tmp_path / "ref", res)


def test_resume_a_finished_run_without_checkpoint_is_refused_and_keeps_rows(tmp_path):
    cfg = tiny_cfg("steps=6", "checkpoint_every=0")
    run_training(cfg, run_dir=tmp_path / "r", progress=False)
    before = open_run(tmp_path / "r").frame()
    with pytest.raises(RunStoreError, match="nothing to resume"):
        run_training(cfg, run_dir=tmp_path / "r", resume=True, progress=False)
    pd.testing.assert_frame_equal(before, open_run(tmp_path / "r").frame())


def test_resume_with_a_different_config_is_refused(tmp_path):
    cfg = tiny_cfg("steps=10")
    run_training(cfg, run_dir=tmp_path / "r", progress=False, stop_after=5)
    other = tiny_cfg("steps=10", "optimizer.lr=0.07")
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        run_training(other, run_dir=tmp_path / "r", resume=True, progress=False)
    # keys that do not change the trajectory may change
    run_training(tiny_cfg("steps=10", "eval_every=5", "checkpoint_every=5"), run_dir=tmp_path / "r", resume=True,
                 progress=False)
    assert open_run(tmp_path / "r").status == "finished"


def test_config_mismatch_lists_dotted_keys():
    a = config_to_dict(tiny_cfg())
    b = config_to_dict(tiny_cfg("optimizer.momentum=0.5", "seed=3", "run_dir=elsewhere", "dataset.num_workers=2"))
    assert config_mismatch(a, b) == ["optimizer.momentum", "seed"]


def test_a_new_run_never_overwrites_an_existing_one(tmp_path):
    cfg = tiny_cfg("steps=4")
    run_training(cfg, run_dir=tmp_path / "r", progress=False)
    before = open_run(tmp_path / "r").frame()
    with pytest.raises(RunStoreError, match="already holds a run"):
        run_training(cfg, run_dir=tmp_path / "r", progress=False)
    (tmp_path / "r" / "manifest.json").unlink()  # stored parts alone still mark a run
    with pytest.raises(RunStoreError, match="already holds a run"):
        run_training(cfg, run_dir=tmp_path / "r", progress=False)
    assert len(before) > 0


def test_tracker_disabled_still_writes_a_readable_run(tmp_path):
    result = run_training(tiny_cfg("steps=6", "tracker.enabled=false"), run_dir=tmp_path / "r", progress=False)
    run = open_run(tmp_path / "r")
    assert result.n_groups == {} and run.status == "finished" and run.frame().empty
    assert {"train", "test"} <= set(run.metrics()["split"])


# ---- the paper's config end to end --------------------------------------------------------------------------


@pytest.mark.slow
def test_paper_vgg16_bn_config_on_tiny_imagenet_fixture_then_report(tmp_path, monkeypatch, capsys):
    make_tiny_imagenet(tmp_path / "data")
    run = tmp_path / "run"
    code, _, err = nmech(monkeypatch, capsys, "train", "vgg16-bn-tinyimagenet-sgd-wd5e-4", "--run-dir", str(run),
                           "--set", "steps=3", "--set", "batch_size=8", "--set", f"dataset.root={tmp_path / 'data'}",
                           "--set", "dataset.num_workers=0", "--set", "device=cpu", "--set", "tracker.log_every=1",
                           "--set", "eval_every=0", "--set", "checkpoint_every=0")
    assert code == 0, err
    r = open_run(run)
    assert r.status == "finished"
    cfg = r.manifest["config"]
    assert cfg["model"] == "vgg16-bn-tinyimagenet" and cfg["optimizer"]["weight_decay"] == 5e-4
    df = r.frame()
    assert sorted(df["step"].unique()) == [0, 1, 2, 3]
    counts = df.query("step == 0")["kind"].value_counts().to_dict()
    assert counts["scale"] == 4224  # one scale group per BatchNorm channel of VGG-16-BN (13 convs)
    assert counts["translation"] >= 1  # at least the softmax-fed classifier
    valid = df[df["valid"]]
    rel = (valid["predicted_exact"] - valid["measured"]).abs() / valid["norm"]
    assert rel.max() < 1e-4
    code, _out, err = nmech(monkeypatch, capsys, "report", str(run))
    assert code == 0, err
    html = (run / "report.html").read_text()
    assert "<html" in html.lower() and len(html) > 10_000
