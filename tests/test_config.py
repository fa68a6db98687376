"""Training config schema: shipped configs, YAML loading, `--set` overrides, validation, LR schedules.

Schedules are checked against torch.optim.lr_scheduler (the brute-force reference for the formulas).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from neural_mechanics.errors import ConfigError
from neural_mechanics.experiments.config import (
    CONFIG_DIR,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
    list_configs,
    load_config,
    lr_multiplier,
    parse_override,
)
from neural_mechanics.experiments.datasets import DATASET_NAMES
from neural_mechanics.experiments.models import PRESETS

# -- shipped configs ---------------------------------------------------------------------------


def test_list_configs_matches_the_files():
    names = list_configs()
    assert set(names) == {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert "demo" in names and len(names) >= 6


@pytest.mark.parametrize("name", list_configs())
def test_every_shipped_config_loads_and_names_real_things(name):
    config = load_config(name)
    assert isinstance(config, TrainConfig)
    assert config.model in PRESETS
    assert config.dataset.name in DATASET_NAMES
    assert config.name == name
    # every key in the file is one the schema knows (load_config would raise otherwise); round trip is exact
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config


def test_paper_configs_have_the_paper_hyperparameters():
    paper = [load_config(n) for n in list_configs() if n.startswith("vgg16")]
    assert len(paper) == 5
    for c in paper:
        assert c.dataset.name == "tinyimagenet" and c.model.endswith("tinyimagenet")
        assert c.optimizer.name == "sgd" and c.optimizer.lr == 0.1 and c.batch_size == 256
        assert c.epochs == 100 and c.steps is None
        assert c.schedule.name == "constant"
    bn_sgd = {
        c.optimizer.weight_decay for c in paper if c.model == "vgg16-bn-tinyimagenet" and c.optimizer.momentum == 0
    }
    assert bn_sgd == {1e-4, 5e-4}
    assert {c.optimizer.momentum for c in paper} == {0.0, 0.9, 0.99}
    assert any(c.model == "vgg16-tinyimagenet" for c in paper)  # the rescale study without BN


def test_demo_config():
    c = load_config("demo")
    assert (c.model, c.dataset.name) == ("digits-vgg-bn", "digits")
    assert c.steps is not None and 100 <= c.steps <= 1000
    assert c.optimizer.momentum == 0.9 and c.optimizer.weight_decay > 0


def test_load_by_path_and_by_name_with_suffix(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: mlp\nsteps: 5\noptimizer: {lr: 0.01}\n")
    c = load_config(path)
    assert (c.model, c.steps, c.optimizer.lr) == ("mlp", 5, 0.01)
    assert c.dataset.name == "digits"  # defaults fill the rest
    assert load_config("demo.yaml") == load_config("demo")


def test_missing_config_file_lists_shipped_ones():
    with pytest.raises(ConfigError, match="did you mean demo"):
        load_config("dem")


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


# -- overrides and types -----------------------------------------------------------------------


def test_overrides_are_coerced_to_field_types():
    c = load_config(
        "demo",
        [
            "optimizer.lr=1e-3",  # YAML 1.1 reads this as a string; coerced to float
            "optimizer.weight_decay=0",  # int -> float
            "batch_size=32.0",  # integral float -> int
            "tracker.kinds=[scale, rescale]",  # list -> tuple
            "grad_clip=1",
            "dataset.root=/data/x",
            "dataset.augment=false",
            "optimizer.betas=[0.8, 0.9]",
            "run_dir=null",
        ],
    )
    assert c.optimizer.lr == 1e-3 and isinstance(c.optimizer.lr, float)
    assert c.optimizer.weight_decay == 0.0 and isinstance(c.optimizer.weight_decay, float)
    assert c.batch_size == 32 and isinstance(c.batch_size, int)
    assert c.tracker.kinds == ("scale", "rescale")
    assert c.grad_clip == 1.0 and c.dataset.root == "/data/x" and c.dataset.augment is False
    assert c.optimizer.betas == (0.8, 0.9) and c.run_dir is None and c.resolved_run_dir == "runs/demo"


def test_single_item_list_shorthand():
    assert load_config("demo", ["tracker.kinds=scale"]).tracker.kinds == ("scale",)


def test_section_shorthand_keeps_other_keys():
    c = load_config("demo", ["optimizer=rmsprop", "dataset=synthetic"])
    assert c.optimizer.name == "rmsprop" and c.optimizer.lr == 0.05 and c.optimizer.momentum == 0.9
    assert c.dataset.name == "synthetic"


def test_steps_and_epochs_override_each_other():
    c = load_config("demo", ["epochs=3"])
    assert (c.steps, c.epochs) == (None, 3.0)
    c = load_config("vgg16-bn-tinyimagenet-sgd-wd1e-4", ["steps=10"])
    assert (c.steps, c.epochs) == (10, None)
    with pytest.raises(ConfigError, match="exactly one"):
        load_config("demo", ["epochs=3", "steps=4"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optimizer.lrr=0.1", "did you mean optimizer.lr"),
        ("optimzer.lr=0.1", "did you mean optimizer"),
        ("foo=1", "valid keys in the top level: name, model"),
        ("optimizer.lr=fast", r"optimizer.lr: expected float, got 'fast'"),
        ("batch_size=32.5", "batch_size: expected int"),
        ("batch_size=true", "batch_size: expected int"),
        ("optimizer.nesterov=1", "expected bool"),
        ("optimizer.name=lamb", "expected 'sgd' | 'adam' | 'adamw' | 'rmsprop'"),
        ("precision=fp8", "precision"),
        ("optimizer.betas=[0.9]", "list of 2"),
        ("steps.x=1", "is a value, not a section"),
        ("lr", "not of the form key=value"),
        ("tracker.kinds=[scale, shift]", "unknown kinds"),
        ("dataset=[1, 2]", "dataset: expected a mapping"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo", [override])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["optimizer.nesterov=true", "optimizer.momentum=0"], "Nesterov"),
        (["optimizer.name=adam"], "adam has no momentum"),
        (["optimizer.lr=0"], "optimizer.lr: must be > 0"),
        (["optimizer.momentum=1.0"], r"\[0, 1\)"),
        (["schedule.name=step"], "milestones or step_size"),
        (["schedule.milestones=[60, 30]"], "increasing"),
        (["grad_accumulation=0"], "grad_accumulation"),
        (["grad_clip=-1"], "grad_clip"),
        (["tracker.log_every=0"], "log_every"),
        (["steps=null"], "exactly one"),
    ],
)
def test_semantic_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("demo", overrides)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model: mlp\nsteps: 5\nschedule:\n  name: cosine\n  warmpu: 10\n")
    with pytest.raises(ConfigError, match=r"did you mean schedule\.warmup") as info:
        load_config(path)
    assert "valid keys in schedule" in str(info.value)


def test_config_is_frozen_and_replace_revalidates():
    c = load_config("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seed = 3  # type: ignore[misc]
    assert dataclasses.replace(c, seed=3).seed == 3
    with pytest.raises(ConfigError):
        dataclasses.replace(c, batch_size=0)


def test_apply_overrides_does_not_mutate_input():
    data = {"optimizer": {"lr": 0.1}, "steps": 3}
    out = apply_overrides(data, ["optimizer.lr=0.2"])
    assert data == {"optimizer": {"lr": 0.1}, "steps": 3} and out["optimizer"]["lr"] == 0.2


def test_config_to_dict_is_plain():
    d = config_to_dict(load_config("demo"))
    assert isinstance(d["tracker"]["kinds"], list) and isinstance(d["optimizer"]["betas"], list)
    assert yaml.safe_load(yaml.safe_dump(d)) == d


@settings(max_examples=50, deadline=None)
@given(
    lr=st.floats(min_value=1e-8, max_value=10.0, allow_nan=False),
    batch=st.integers(min_value=1, max_value=10_000),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_override_round_trip_property(lr, batch, seed):
    c = load_config("demo", [f"optimizer.lr={lr!r}", f"batch_size={batch}", f"seed={seed}"])
    assert (c.optimizer.lr, c.batch_size, c.seed) == (lr, batch, seed)


def test_parse_override_values():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x=a=b") == (["x"], "a=b")


# -- schedules against torch.optim.lr_scheduler ------------------------------------------------


def torch_lrs(make_scheduler, steps: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_matches_torch():
    total = 50
    s = ScheduleConfig(name="cosine", min_factor=0.1)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total, eta_min=0.1), total)
    ours = [lr_multiplier(s, k, total) for k in range(total)]
    assert ours == pytest.approx(ref, abs=1e-12)
    assert lr_multiplier(s, total, total) == pytest.approx(0.1)


def test_step_schedules_match_torch():
    s = ScheduleConfig(name="step", milestones=(5, 12), gamma=0.5)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[5, 12], gamma=0.5), 20)
    assert [lr_multiplier(s, k, 20) for k in range(20)] == pytest.approx(ref, abs=1e-12)
    s = ScheduleConfig(name="step", step_size=4, gamma=0.3)
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.3), 20)
    assert [lr_multiplier(s, k, 20) for k in range(20)] == pytest.approx(ref, abs=1e-12)


def test_warmup_then_cosine_and_epoch_units():
    s = ScheduleConfig(name="cosine", warmup=4)
    assert [lr_multiplier(s, k, 20) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # after warmup: cosine over the remaining 16 steps, by direct recomputation
    for k in range(4, 20):
        assert lr_multiplier(s, k, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * (k - 4) / 16)))
    # epoch units: milestones at epochs 2 and 3 with 10 steps per epoch = steps 20 and 30
    e = ScheduleConfig(name="step", unit="epoch", milestones=(2, 3), gamma=0.1)
    assert [lr_multiplier(e, k, 40, steps_per_epoch=10) for k in (19, 20, 29, 30)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01]
    )
    assert lr_multiplier(ScheduleConfig(), 123, 200) == 1.0
