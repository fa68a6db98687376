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
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from neural_mechanics.errors import ConfigError
from neural_mechanics.symmetry.kinds import KINDS

CONFIG_DIR = Path(__file__).parent / "configs"

OptimizerName = Literal["sgd", "adam", "adamw", "rmsprop"]
ScheduleName = Literal["constant", "cosine", "step"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DatasetConfig:
    """Which data: `name` as in `experiments.datasets.load_dataset`; `root` defaults to $NMECH_DATA or ./data."""

    name: str = "digits"
    root: str | None = None
    augment: bool | None = None  # None: the dataset's default (crop + flip on the train split of image datasets)
    eval_split: Literal["val", "test"] = "test"
    num_workers: int = 0


@dataclass(frozen=True)
class OptimizerConfig:
    """A stock torch.optim optimizer. momentum/dampening/nesterov apply to sgd (momentum also to rmsprop);
    betas/eps to adam/adamw; alpha/eps to rmsprop."""

    name: OptimizerName = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.99


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


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Exactly one of `steps` and `epochs` is set; eval/checkpoint intervals are in steps
    (0 = only at the end / never)."""

    name: str = "run"
    model: str = "digits-vgg-bn"
    num_classes: int | None = None
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
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
    run_dir: str | None = None  # None: runs/<name>
    description: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def resolved_run_dir(self) -> str:
        return self.run_dir if self.run_dir is not None else f"runs/{self.name}"


# -- validation of values (beyond types) -------------------------------------------------------


def _check(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}", fix)


def _validate(c: TrainConfig) -> None:
    _check(
        (c.steps is None) != (c.epochs is None),
        "steps/epochs",
        f"exactly one of steps and epochs must be set (got steps={c.steps}, epochs={c.epochs})",
        "set one of them and put the other to null",
    )
    if c.steps is not None:
        _check(c.steps >= 1, "steps", f"must be >= 1, got {c.steps}", "use a positive number of steps")
    if c.epochs is not None:
        _check(c.epochs > 0, "epochs", f"must be > 0, got {c.epochs}", "use a positive number of epochs")
    _check(c.batch_size >= 1, "batch_size", f"must be >= 1, got {c.batch_size}", "use a positive batch size")
    _check(c.grad_accumulation >= 1, "grad_accumulation", f"must be >= 1, got {c.grad_accumulation}", "use 1 for off")
    if c.grad_clip is not None:
        _check(c.grad_clip > 0, "grad_clip", f"must be > 0 or null, got {c.grad_clip}", "use null to turn it off")
    for key in ("eval_every", "checkpoint_every"):
        _check(getattr(c, key) >= 0, key, f"must be >= 0, got {getattr(c, key)}", "use 0 for only-at-end/never")
    if c.num_classes is not None:
        _check(c.num_classes >= 1, "num_classes", f"must be >= 1, got {c.num_classes}", "or null for the default")
    _check(c.dataset.num_workers >= 0, "dataset.num_workers", "must be >= 0", "use 0 to load in the main process")
    o = c.optimizer
    _check(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}", "use a positive learning rate")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}", "use 0 for off")
    _check(0 <= o.momentum < 1, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}", "e.g. 0.9")
    _check(0 <= o.dampening <= 1, "optimizer.dampening", f"must be in [0, 1], got {o.dampening}", "usually 0")
    if o.name in ("adam", "adamw"):
        _check(
            o.momentum == 0 and o.dampening == 0 and not o.nesterov,
            "optimizer.momentum",
            f"{o.name} has no momentum/dampening/nesterov (its momentum is betas[0])",
            "remove them and set optimizer.betas instead",
        )
        _check(
            all(0 <= b < 1 for b in o.betas),
            "optimizer.betas",
            f"must be in [0, 1), got {o.betas}",
            "e.g. [0.9, 0.999]",
        )
    if o.nesterov:
        _check(
            o.name == "sgd" and o.momentum > 0 and o.dampening == 0,
            "optimizer.nesterov",
            "Nesterov momentum needs sgd with momentum > 0 and dampening 0 (torch.optim.SGD's rule)",
            "set optimizer.momentum (e.g. 0.9) and dampening 0, or nesterov false",
        )
    if o.name == "rmsprop":
        _check(o.dampening == 0, "optimizer.dampening", "rmsprop has no dampening", "remove it")
    s = c.schedule
    _check(s.warmup >= 0, "schedule.warmup", f"must be >= 0, got {s.warmup}", "use 0 for no warmup")
    _check(0 <= s.min_factor <= 1, "schedule.min_factor", f"must be in [0, 1], got {s.min_factor}", "e.g. 0")
    _check(s.gamma > 0, "schedule.gamma", f"must be > 0, got {s.gamma}", "e.g. 0.1")
    _check(s.step_size >= 0, "schedule.step_size", f"must be >= 0, got {s.step_size}", "use 0 with milestones")
    _check(
        list(s.milestones) == sorted(s.milestones) and all(m > 0 for m in s.milestones),
        "schedule.milestones",
        f"must be positive and increasing, got {list(s.milestones)}",
        "e.g. [30, 60, 90]",
    )
    if s.name == "step":
        _check(
            bool(s.milestones) or s.step_size > 0,
            "schedule",
            "a step schedule needs milestones or step_size",
            "set schedule.milestones (e.g. [30, 60]) or schedule.step_size",
        )
    t = c.tracker
    _check(t.log_every >= 1, "tracker.log_every", f"must be >= 1, got {t.log_every}", "e.g. 10")
    unknown = [k for k in t.kinds if k not in KINDS]
    _check(not unknown, "tracker.kinds", f"unknown kinds {unknown}", f"use a subset of {sorted(KINDS)}")


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


# -- dict <-> dataclass with type checking -----------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or _Mismatch. Lossless coercions only: int -> float, integral float -> int,
    numeric strings (YAML 1.1 reads 1e-4 as a string) -> int/float, list -> tuple."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise _Mismatch
    if origin is tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            if isinstance(value, str | int | float) and len(get_args(tp)) == 2 and get_args(tp)[1] is Ellipsis:
                value = [value]  # a single item for a variable-length list
            else:
                raise _Mismatch
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
            value = {"name": value}  # shorthand: `optimizer: adam`, `dataset: cifar10`
        if not isinstance(value, Mapping):
            raise _Mismatch
        return _from_mapping(tp, value, key + ".")  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise _Mismatch from None
            if f.is_integer():
                return int(f)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"config schema uses unsupported type {tp!r} at {key}")  # a bug here, not user input


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""
    where = prefix.rstrip(".") or "the top level"
    return ConfigError(f"unknown config key {prefix + key!r}", f"{hint}valid keys in {where}: {', '.join(valid)}")


def _from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(cls, str(key), prefix)
        try:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
        except _Mismatch:
            raise ConfigError(
                f"{prefix + key}: expected {_type_name(hints[key])}, got {value!r} ({type(value).__name__})",
                f"set {prefix + key} to a value of type {_type_name(hints[key])}",
            ) from None
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build and validate a TrainConfig from a (YAML-shaped) mapping; missing keys take their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}", "see demo.yaml")
    config: TrainConfig = _from_mapping(TrainConfig, data)
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
                raise _unknown_key(cls, part, prefix)
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
