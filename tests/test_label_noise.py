"""`dataset.label_noise`: a fixed fraction of the training labels replaced by uniform random ones.

Checked against a direct recomputation: the wrapped dataset's labels compared with the clean ones entry by entry.
"""

from __future__ import annotations

import pytest
import torch

from neural_mechanics.errors import ConfigError, DatasetError
from neural_mechanics.experiments.config import load_config
from neural_mechanics.experiments.datasets import load_dataset
from neural_mechanics.experiments.datasets.label_noise import NoisyLabels
from neural_mechanics.experiments.datasets.registry import dataset_from_config

torch.set_num_threads(1)


def _labels(info):
    return torch.tensor([int(info.dataset[i][1]) for i in range(len(info.dataset))])


def test_label_noise_replaces_exactly_the_chosen_fraction_and_keeps_the_inputs():
    clean = load_dataset("digits", seed=0)
    noisy = load_dataset("digits", seed=0, label_noise=0.3)
    ds = noisy.dataset
    assert isinstance(ds, NoisyLabels) and len(ds) == len(clean.dataset)
    n = len(clean.dataset)
    assert len(ds.replaced) == round(0.3 * n)  # the chosen set: round(fraction * N) distinct indices
    y_clean, y_noisy = _labels(clean), _labels(noisy)
    changed = set(torch.nonzero(y_clean != y_noisy).flatten().tolist())
    assert changed <= set(ds.replaced)  # only chosen entries change...
    # ...and a uniform random label equals the true one with probability 1/K: about 27 % of the labels are wrong
    assert abs(len(changed) / n - 0.3 * 0.9) < 0.05
    assert all(0 <= y < 10 for y in ds.replaced.values())
    for i in (0, 5, n - 1):  # the inputs are the clean dataset's
        assert torch.equal(ds[i][0], clean.dataset[i][0])


def test_label_noise_is_fixed_by_the_seed_and_touches_only_the_train_split():
    a = _labels(load_dataset("digits", seed=0, label_noise=0.3))
    assert torch.equal(a, _labels(load_dataset("digits", seed=0, label_noise=0.3)))  # every epoch, every run
    b = NoisyLabels(load_dataset("digits", seed=0).dataset, 0.3, 10, seed=1)
    assert not torch.equal(a, torch.tensor([int(b[i][1]) for i in range(len(b))]))
    test_clean, test_noisy = (load_dataset("digits", split="test", label_noise=f) for f in (0.0, 0.3))
    assert not isinstance(test_noisy.dataset, NoisyLabels)
    assert torch.equal(_labels(test_clean), _labels(test_noisy))


def test_label_noise_from_the_shipped_config_and_its_bounds():
    cfg = load_config("digits-adamw-noisy")
    assert cfg.dataset.label_noise == 0.3 and cfg.optimizer.name == "adamw"
    assert isinstance(dataset_from_config(cfg.dataset, "train", seed=cfg.seed).dataset, NoisyLabels)
    assert not isinstance(dataset_from_config(cfg.dataset, "test", seed=cfg.seed).dataset, NoisyLabels)
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match="label_noise"):
            load_config("digits-adamw-noisy", [f"dataset.label_noise={bad}"])


def test_label_noise_on_targets_that_are_not_class_labels_is_a_dataset_error():
    with pytest.raises(DatasetError, match="not class labels"):
        load_dataset("synthetic", targets="regression", num_samples=8, label_noise=0.3)
