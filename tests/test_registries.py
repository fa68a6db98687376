"""The harness registries: optimizers and datasets are registered specs, and one registration makes a new one
usable from a config, through validation, building and a short training run.

References: every built-in optimizer spec must build exactly the torch optimizer the config describes (compared
with the torch class constructed directly from the same hyperparameters); a registered dataset must come back
from `load_dataset` as the builder made it.
"""

from __future__ import annotations

import pytest
import torch

from neural_mechanics.errors import ConfigError, DatasetError
from neural_mechanics.experiments.config import load_config
from neural_mechanics.experiments.datasets import (
    DATASET_NAMES,
    DATASETS,
    DataOptions,
    DatasetInfo,
    DatasetSpec,
    TensorClassification,
    dataset_names,
    get_dataset,
    load_dataset,
    register_dataset,
)
from neural_mechanics.experiments.datasets import registry as dataset_registry
from neural_mechanics.experiments.models import get_preset
from neural_mechanics.experiments.optimizers import (
    OPTIMIZERS,
    OptimizerConfig,
    OptimizerSpec,
    build_optimizer,
    get_optimizer,
    optimizer_names,
    register_optimizer,
)
from neural_mechanics.experiments.train import run_training
from neural_mechanics.tracking.store import open_run
from test_train import tiny_cfg

torch.set_num_threads(1)


@pytest.fixture
def restore_registries():
    """Registrations made by a test are undone afterwards."""
    saved = dict(OPTIMIZERS), dict(DATASETS), dict(dataset_registry._ALIASES)
    yield
    for live, old in zip((OPTIMIZERS, DATASETS, dataset_registry._ALIASES), saved, strict=True):
        live.clear()
        live.update(old)


ADAGRAD = OptimizerSpec("adagrad", torch.optim.Adagrad, keys=("lr", "eps", "weight_decay"),
                        description="torch.optim.Adagrad")


# ---- optimizers --------------------------------------------------------------------------------------------


def test_builtin_optimizers_are_registered_in_their_historical_order():
    assert optimizer_names()[:4] == ("sgd", "adam", "adamw", "rmsprop")


@pytest.mark.parametrize(("name", "cls", "kwargs"), [
    ("sgd", torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=5e-4)),
    ("adam", torch.optim.Adam, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=5e-4)),
    ("adamw", torch.optim.AdamW, dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=5e-4)),
    ("rmsprop", torch.optim.RMSprop, dict(lr=0.05, alpha=0.9, eps=1e-6, momentum=0.5, weight_decay=5e-4)),
])
def test_builtin_specs_build_the_torch_optimizer_the_config_describes(name, cls, kwargs):
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    cfg = OptimizerConfig(name=name, **kwargs)
    built = build_optimizer(cfg, params)
    direct = cls(params, **kwargs)  # the brute-force reference: the torch class called by hand
    assert type(built) is cls
    strip = [{k: v for k, v in g.items() if k != "params"} for g in built.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in direct.param_groups]


def test_unknown_optimizer_name_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean adam, adamw") as info:
        load_config("demo", ["optimizer.name=adamx"])
    assert "optimizer.name" in info.value.what and "rmsprop" in (info.value.fix or "")
    with pytest.raises(ConfigError, match="did you mean sgd"):
        get_optimizer("sgdd")


def test_a_registered_optimizer_is_one_entry_away_from_training(tmp_path, restore_registries):
    with pytest.raises(ConfigError, match="adagrad"):
        load_config("demo", ["optimizer.name=adagrad"])
    register_optimizer(ADAGRAD)
    cfg = load_config("demo", ["optimizer=adagrad", "optimizer.momentum=0", "optimizer.lr=0.01"])
    opt = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.Adagrad)
    group = opt.param_groups[0]
    assert (group["lr"], group["eps"], group["weight_decay"]) == (0.01, cfg.optimizer.eps, 5e-4)
    # and through the whole harness: the tracker rides on it (no exact theory for Adagrad, so it says so)
    result = run_training(tiny_cfg("steps=4", "optimizer=adagrad", "optimizer.momentum=0", "optimizer.lr=0.01"),
                          run_dir=tmp_path / "run", progress=False)
    assert result.steps == 4 and result.status == "finished"
    run = open_run(tmp_path / "run")
    assert run.manifest["config"]["optimizer"]["name"] == "adagrad"
    assert "Adagrad" in run.manifest["not_applicable"]


def test_a_spec_without_a_validator_refuses_keys_its_optimizer_does_not_take(restore_registries):
    register_optimizer(ADAGRAD)
    with pytest.raises(ConfigError, match=r"optimizer\.momentum: adagrad does not take momentum") as info:
        load_config("demo", ["optimizer=adagrad"])  # the demo config sets momentum 0.9
    assert "eps" in (info.value.fix or "")
    with pytest.raises(ConfigError, match="does not take betas, alpha"):
        load_config("demo", ["optimizer=adagrad", "optimizer.momentum=0", "optimizer.betas=[0.5, 0.5]",
                             "optimizer.alpha=0.5"])


def test_a_spec_with_a_validator_is_asked(restore_registries):
    def positive_eps_only_small(cfg: OptimizerConfig) -> None:
        if cfg.eps > 1e-3:
            raise ConfigError("optimizer.eps: too large for this test optimizer", "use eps <= 1e-3")

    register_optimizer(OptimizerSpec("adagrad", torch.optim.Adagrad, keys=("lr", "eps"),
                                     validate=positive_eps_only_small))
    load_config("demo", ["optimizer=adagrad", "optimizer.eps=1e-4"])  # momentum is not refused: its own validator
    with pytest.raises(ConfigError, match="too large"):
        load_config("demo", ["optimizer=adagrad", "optimizer.eps=0.1"])


def test_registration_errors_are_programming_errors(restore_registries):
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer(OptimizerSpec("sgd", torch.optim.SGD, keys=("lr",)))
    with pytest.raises(ValueError, match="does not have"):
        register_optimizer(OptimizerSpec("lamb", torch.optim.Adam, keys=("lr", "trust_ratio")))
    register_optimizer(OptimizerSpec("sgd", torch.optim.SGD, keys=("lr",)), replace=True)
    assert get_optimizer("sgd").keys == ("lr",)


# ---- datasets ----------------------------------------------------------------------------------------------


def _toy_builder(split: str, options: DataOptions) -> DatasetInfo:
    """40 (train) or 20 examples of shape 1x8x8 in 10 classes, seeded by (seed, split)."""
    gen = torch.Generator().manual_seed(options.seed * 10 + (split == "train"))
    n = 40 if split == "train" else 20
    x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.arange(n) % 10
    return DatasetInfo(TensorClassification(x, y), 10, (1, 8, 8), "toyset", split)


TOYSET = DatasetSpec("toyset", _toy_builder, "random 1x8x8 tensors", aliases=("toy-set",), keys=("root",))


def test_builtin_datasets_and_aliases():
    assert dataset_names()[:7] == DATASET_NAMES == ("digits", "tinyimagenet", "cifar10", "cifar100", "synthetic",
                                                    "imagefolder", "tokens")
    assert get_dataset("Tiny-ImageNet").name == "tinyimagenet" and get_dataset("CIFAR10").name == "cifar10"
    assert load_config("demo", ["dataset.name=tiny-imagenet"]).dataset.name == "tiny-imagenet"  # kept as written


def test_unknown_dataset_in_a_config_is_a_config_error_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="did you mean cifar10") as info:
        load_config("demo", ["dataset.name=cifar11", f"run_dir={tmp_path / 'r'}"])
    assert info.value.what.startswith("dataset.name: unknown dataset 'cifar11'")
    assert not (tmp_path / "r").exists()
    with pytest.raises(DatasetError, match="did you mean cifar10"):  # the library call keeps its own error
        load_dataset("cifar11")


def test_a_registered_dataset_loads_validates_its_keys_and_trains(tmp_path, restore_registries):
    register_dataset(TOYSET)
    info = load_dataset("Toy-Set", split="test", seed=3)
    again = _toy_builder("test", DataOptions(root=tmp_path, augment=False, seed=3))
    assert info.name == "toyset" and len(info) == 20
    assert all(torch.equal(info.dataset[i][0], again.dataset[i][0]) for i in range(20))

    assert load_config("demo", ["dataset=toyset", "dataset.root=/somewhere"]).dataset.root == "/somewhere"
    with pytest.raises(ConfigError, match=r"dataset\.augment: toyset does not read augment") as err:
        load_config("demo", ["dataset=toyset", "dataset.augment=true"])
    assert "reads root" in (err.value.fix or "")

    result = run_training(tiny_cfg("steps=3", "dataset=toyset", "batch_size=8"), run_dir=tmp_path / "run",
                          progress=False)
    assert result.steps == 3 and set(open_run(tmp_path / "run").metrics()["split"]) == {"train", "test"}


def test_a_dataset_spec_with_its_own_validator(restore_registries):
    def needs_root(cfg) -> None:
        if cfg.root is None:
            raise ConfigError("dataset.root: toyset needs a root", "set dataset.root")
        get_dataset(cfg.name).refuse_unused_keys(cfg)  # and the default rule on top

    register_dataset(DatasetSpec("toyset", _toy_builder, "random tensors", keys=("root",), validate=needs_root))
    with pytest.raises(ConfigError, match="toyset needs a root"):
        load_config("demo", ["dataset=toyset"])
    assert load_config("demo", ["dataset=toyset", "dataset.root=x"]).dataset.root == "x"
    with pytest.raises(ConfigError, match="does not read augment"):
        load_config("demo", ["dataset=toyset", "dataset.root=x", "dataset.augment=false"])


def test_dataset_registration_errors(restore_registries):
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(DatasetSpec("mine", _toy_builder, "x", aliases=("tiny-imagenet",)))
    with pytest.raises(ValueError, match="lower case"):
        register_dataset(DatasetSpec("Mine", _toy_builder, "x"))
    with pytest.raises(ValueError, match="does not have"):
        register_dataset(DatasetSpec("mine", _toy_builder, "x", keys=("colour",)))
    assert "mine" not in DATASETS


# ---- the optimizers of issue 14: lion (optional package) and muon (matrices only) ------------------------


def test_lion_builds_lion_pytorch_with_the_configs_values():
    lion_pytorch = pytest.importorskip("lion_pytorch")  # an optional extra (`lion`), installed by make test
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    cfg = load_config("demo", ["optimizer=lion", "optimizer.lr=1e-4", "optimizer.betas=[0.9, 0.99]",
                               "optimizer.weight_decay=1.0", "optimizer.momentum=0"]).optimizer
    built = build_optimizer(cfg, params)
    direct = lion_pytorch.Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=1.0)  # called by hand
    assert type(built) is lion_pytorch.Lion
    strip = [{k: v for k, v in g.items() if k != "params"} for g in built.param_groups]
    assert strip == [{k: v for k, v in g.items() if k != "params"} for g in direct.param_groups]
    with pytest.raises(ConfigError, match=r"optimizer\.momentum: lion does not take momentum"):
        load_config("demo", ["optimizer=lion"])  # the demo's momentum 0.9 is refused, not silently dropped


def test_lion_missing_is_a_config_error_that_says_how_to_install_it(monkeypatch):
    from neural_mechanics.experiments import optimizers

    real = optimizers.importlib.util.find_spec
    monkeypatch.setattr(optimizers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lion_pytorch" else real(name, *a))
    with pytest.raises(ConfigError, match="lion-pytorch") as info:
        load_config("demo", ["optimizer=lion", "optimizer.momentum=0"])
    assert "neural-mechanics[lion]" in (info.value.fix or "")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is new in torch 2.9")
def test_muon_trains_matrices_only_and_says_which_model_to_use():
    cfg = load_config("demo", ["optimizer=muon", "optimizer.lr=0.02", "optimizer.momentum=0.95",
                               "optimizer.nesterov=true", "optimizer.weight_decay=0.1"]).optimizer
    matrices = get_preset("mlp-bn-matrices").build()
    assert all(p.ndim == 2 for p in matrices.parameters())
    built = build_optimizer(cfg, matrices.parameters())
    assert type(built) is torch.optim.Muon
    group = built.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.02, 0.95, True, 0.1)
    with pytest.raises(ConfigError, match="2-D parameters only") as info:
        build_optimizer(cfg, get_preset("mlp-bn").build().parameters())  # biases and BatchNorm affines
    assert "mlp-bn-matrices" in (info.value.fix or "")
    with pytest.raises(ConfigError, match=r"optimizer\.betas"):
        load_config("demo", ["optimizer=muon", "optimizer.betas=[0.5, 0.5]"])
