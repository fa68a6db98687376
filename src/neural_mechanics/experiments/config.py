"""The training config: a typed schema (frozen dataclasses), YAML loading, `--set a.b=value` overrides.

`nmech train CONFIG.yaml --set optimizer.lr=0.05 --set tracker.log_every=5` reads a YAML file into
`TrainConfig`. Every key is checked against the schema: an unknown key or a value of the wrong type is
a ConfigError that names the key, lists the valid keys there (with close-match suggestions) and says
what type was expected - a typo must not silently train the wrong experiment. Values given on the
command line are parsed as YAML scalars (so `0.1`, `1e-4`, `true`, `null`, `[scale, rescale]` work) and
then coerced to the field's type exactly like values from the file.

The paper's runs ship as YAML files in `experiments/configs/` (`list_configs()`; `load_config("demo")`
finds a shipped config by name). Schedules are given in steps or epochs (`schedule.unit`);
`lr_multiplier` states the schedule formulas so the training loop and tests share one definition.

The `optimizer`, `dataset` and `loss` sections belong to their registries (`OptimizerConfig` in
`experiments.optimizers`, `DatasetConfig` in `experiments.datasets`, `LossConfig` in `experiments.objectives`): a
name is valid when it is registered, and each optimizer or dataset validates the keys it reads. The mapping ->
dataclass machinery is `experiments.schema`. A key added to a section needs a default that keeps every existing
config meaning what it meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import yaml

from neural_mechanics.errors import ConfigError
from neural_mechanics.experiments.datasets import DatasetConfig, validate_dataset_config
from neural_mechanics.experiments.objectives import LossConfig
from neural_mechanics.experiments.optimizers import OptimizerConfig, validate_optimizer
from neural_mechanics.experiments.schema import check, from_mapping, unknown_key
from neural_mechanics.symmetry.kinds import KINDS

CONFIG_DIR = Path(__file__).parent / "configs"

ScheduleName = Literal["constant", "cosine", "step"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate multiplier over training (see `lr_multiplier`); warmup/milestones/step_size count `unit`s."""

    name: ScheduleName = "constant"
    unit: Literal["step", "epoch"] = "step"
    warmup: int = 0
    min_factor: float = 0.0  # cosine: the multiplier it decays to
    milestones: tuple[int, ...] = ()  # step: multiply by gamma at each milestone
    step_size: int = 0  # step: if > 0 and no milestones, multiply by gamma every step_size units
    gamma: float = 0.1


@dataclass(frozen=True)
class TrackerConfig:
    """What the symmetry tracker logs: every `log_every` steps (plus log-spaced steps if `log_spaced`)."""

    enabled: bool = True
    log_every: int = 10
    log_spaced: bool = False
    kinds: tuple[str, ...] = ("translation", "scale", "rescale")


#: `distributed.strategy` values: how the model is spread over the ranks of a torchrun run.
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp2")


@dataclass(frozen=True)
class DistributedConfig:
    """How a run under torchrun (WORLD_SIZE > 1) spreads the model: "ddp" (DistributedDataParallel: a replica per
    rank) or "fsdp2" (torch.distributed.fsdp.fully_shard: every parameter sharded by rows; sharded checkpoints).
    One process ignores it, except that "fsdp2" keeps its checkpoint format (so a run can move between world
    sizes). docs/distributed.md."""

    strategy: str = "ddp"


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Exactly one of `steps` and `epochs` is set; eval/checkpoint intervals are in steps
    (0 = only at the end / never)."""

    name: str = "run"
    model: str = "digits-vgg-bn"
    num_classes: int | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    batch_size: int = 128
    steps: int | None = None
    epochs: float | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    grad_clip: float | None = None  # global L2 norm (torch.nn.utils.clip_grad_norm_); None = off
    grad_accumulation: int = 1
    seed: int = 0
    device: str = "auto"
    precision: Precision = "fp32"
    eval_every: int = 0
    checkpoint_every: int = 0
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run_dir: str | None = None  # None: runs/<name>
    description: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir if self.run_dir is not None else f"runs/{self.name}"


# -- validation of values (beyond types) -------------------------------------------------------


def _validate(c: TrainConfig) -> None:
    check(
        (c.steps is None) != (c.epochs is None),
        "steps/epochs",
        f"exactly one of steps and epochs must be set (got steps={c.steps}, epochs={c.epochs})",
        "set one of them and put the other to null",
    )
    if c.steps is not None:
        check(c.steps >= 1, "steps", f"must be >= 1, got {c.steps}", "use a positive number of steps")
    if c.epochs is not None:
        check(c.epochs > 0, "epochs", f"must be > 0, got {c.epochs}", "use a positive number of epochs")
    check(c.batch_size >= 1, "batch_size", f"must be >= 1, got {c.batch_size}", "use a positive batch size")
    check(c.grad_accumulation >= 1, "grad_accumulation", f"must be >= 1, got {c.grad_accumulation}", "use 1 for off")
    if c.grad_clip is not None:
        check(c.grad_clip > 0, "grad_clip", f"must be > 0 or null, got {c.grad_clip}", "use null to turn it off")
    for key in ("eval_every", "checkpoint_every"):
        check(getattr(c, key) >= 0, key, f"must be >= 0, got {getattr(c, key)}", "use 0 for only-at-end/never")
    if c.num_classes is not None:
        check(c.num_classes >= 1, "num_classes", f"must be >= 1, got {c.num_classes}", "or null for the default")
    validate_dataset_config(c.dataset)
    validate_optimizer(c.optimizer)
    s = c.schedule
    check(s.warmup >= 0, "schedule.warmup", f"must be >= 0, got {s.warmup}", "use 0 for no warmup")
    check(0 <= s.min_factor <= 1, "schedule.min_factor", f"must be in [0, 1], got {s.min_factor}", "e.g. 0")
    check(s.gamma > 0, "schedule.gamma", f"must be > 0, got {s.gamma}", "e.g. 0.1")
    check(s.step_size >= 0, "schedule.step_size", f"must be >= 0, got {s.step_size}", "use 0 with milestones")
    check(
        list(s.milestones) == sorted(s.milestones) and all(m > 0 for m in s.milestones),
        "schedule.milestones",
        f"must be positive and increasing, got {list(s.milestones)}",
        "e.g. [30, 60, 90]",
    )
    if s.name == "step":
        check(
            bool(s.milestones) or s.step_size > 0,
            "schedule",
            "a step schedule needs milestones or step_size",
            "set schedule.milestones (e.g. [30, 60]) or schedule.step_size",
        )
    strategy = c.distributed.strategy
    check(strategy not in ("fsdp", "fsdp1"), "distributed.strategy",
          f"{strategy!r} (FSDP1, FullyShardedDataParallel) is not supported: its flat parameters hide which rows a "
          "rank holds, so the tracker cannot follow them", "use fsdp2 (fully_shard) or ddp")
    check(strategy in DISTRIBUTED_STRATEGIES, "distributed.strategy", f"unknown strategy {strategy!r}",
          f"use one of {', '.join(DISTRIBUTED_STRATEGIES)}")
    check(not (strategy == "fsdp2" and c.precision == "fp16"), "precision",
          "fp16 with distributed.strategy=fsdp2 is not supported (its gradient scaler is not shard-aware)",
          "use precision bf16 (or fp32) with fsdp2")
    t = c.tracker
    check(t.log_every >= 1, "tracker.log_every", f"must be >= 1, got {t.log_every}", "e.g. 10")
    unknown = [k for k in t.kinds if k not in KINDS]
    check(not unknown, "tracker.kinds", f"unknown kinds {unknown}", f"use a subset of {sorted(KINDS)}")


def lr_multiplier(schedule: ScheduleConfig, step: int, total_steps: int, steps_per_epoch: int = 1) -> float:
    """The factor the base learning rate is multiplied by at (0-based) optimizer step `step`.

    With u = steps per unit (1 for unit "step", steps_per_epoch for "epoch"), t = step / u, T = total_steps / u,
    W = warmup: warmup (if W > 0 and t < W) gives (t + 1/u) / W, linear up to 1; afterwards
      constant: 1;  step: gamma^(number of milestones <= t), or gamma^floor(t / step_size);
      cosine: m + (1 - m) (1 + cos(pi (t - W) / (T - W))) / 2 with m = min_factor.
    """
    per_unit = steps_per_epoch if schedule.unit == "epoch" else 1
    t = step / per_unit
    total = total_steps / per_unit
    if schedule.warmup > 0 and t < schedule.warmup:
        return min(1.0, (t + 1.0 / per_unit) / schedule.warmup)
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "step":
        if schedule.milestones:
            return float(schedule.gamma ** sum(1 for m in schedule.milestones if t >= m))
        return float(schedule.gamma ** math.floor(t / schedule.step_size))
    span = max(total - schedule.warmup, 1e-12)
    progress = min(max((t - schedule.warmup) / span, 0.0), 1.0)
    m = schedule.min_factor
    return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


# -- dict <-> dataclass -------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from a (YAML-shaped) mapping; missing keys take their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}", "see demo.yaml")
    config: TrainConfig = from_mapping(TrainConfig, data)
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """A plain (YAML/JSON-serialisable) dict; `config_from_dict(config_to_dict(c)) == c`."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))  # type: ignore[no-any-return]


def dump_config(config: TrainConfig) -> str:
    """The config as YAML text (loads back to an equal config)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


# -- overrides ---------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as a YAML scalar/list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form key=value", "write e.g. --set optimizer.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of the config mapping with each `a.b=value` set; unknown keys raise ConfigError."""
    out: dict[str, Any] = _deep_copy(data)
    overrides = list(overrides)
    touched = {parse_override(t)[0][0] for t in overrides}
    for text in overrides:
        path, value = parse_override(text)
        # steps and epochs are alternatives: setting one (and not the other) clears the file's value of the other
        for this, other in (("steps", "epochs"), ("epochs", "steps")):
            if path == [this] and value is not None and other not in touched:
                out[other] = None
        cls: type = TrainConfig
        node = out
        for depth, part in enumerate(path):
            names = {f.name: f for f in dataclasses.fields(cls)}
            prefix = "".join(p + "." for p in path[:depth])
            if part not in names:
                raise unknown_key(cls, part, prefix)
            if depth == len(path) - 1:
                sub_type = get_type_hints(cls)[part]
                if dataclasses.is_dataclass(sub_type) and isinstance(value, str) and isinstance(node.get(part), dict):
                    node[part]["name"] = value  # `--set optimizer=adam` keeps the section's other keys
                else:
                    node[part] = value
                break
            sub = get_type_hints(cls)[part]
            if not dataclasses.is_dataclass(sub):
                raise ConfigError(
                    f"override {text!r}: {prefix + part} is a value, not a section, "
                    f"so it has no key {path[depth + 1]!r}",
                    f"write --set {prefix + part}=VALUE",
                )
            existing = node.get(part)
            if isinstance(existing, str) and "name" in {f.name for f in dataclasses.fields(sub)}:
                existing = {"name": existing}  # `loss: mse` (the shorthand), then --set loss.class_dim=...
                node[part] = existing
            if not isinstance(existing, dict):
                existing = {}
                node[part] = existing
            node = existing
            cls = sub  # type: ignore[assignment]
    return out


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in data.items()}


# -- files -------------------------------------------------------------------------------------


def list_configs() -> tuple[str, ...]:
    """Names of the shipped configs (file stems in experiments/configs/), sorted."""
    return tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))


def config_path(name_or_path: str | Path) -> Path:
    """A YAML file path, or the shipped config called `name_or_path` (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = list_configs()
    close = difflib.get_close_matches(path.stem, names, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"config file {str(name_or_path)!r} not found",
        f"{hint}give a path to a YAML file or a shipped config: {', '.join(names)}",
    )


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a YAML config (a path or a shipped name), apply `a.b=value` overrides, validate. ConfigError on problems."""
    file = config_path(path)
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file} is not valid YAML: {exc}", "fix the syntax (indentation, colons, quotes)") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{file} must hold a mapping of keys to values, got {type(data).__name__}", "see demo.yaml")
    return config_from_dict(apply_overrides(data, overrides))
