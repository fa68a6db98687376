"""The default dataset, "digits": scikit-learn's 8x8 handwritten digits (they ship with scikit-learn, so the demo
needs no download).

1x8x8 tensors standardised with the training split's mean and std (one scalar each), and a fixed stratified
train/test split chosen by the seed (`test_fraction` of the 1797 images are held out; "val" is the same held-out
part as "test").
"""

from __future__ import annotations

import numpy as np
import torch

from neural_mechanics.experiments.datasets.images import TensorClassification
from neural_mechanics.experiments.datasets.registry import DataOptions, DatasetInfo


def build_digits(split: str, options: DataOptions) -> DatasetInfo:
    """Split `split` of the digits: x = (pixels - mean) / std with mean, std over the training part."""
    # scikit-learn is imported here, not at module level: importing it takes ~1.5 s of CPU, which every `nmech`
    # command would pay (the registry imports this module), and only this dataset needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=options.test_fraction,
                                                        random_state=options.seed, stratify=y)
    mean, std = float(x_train.mean()), float(x_train.std())
    xs, ys = (x_train, y_train) if split == "train" else (x_test, y_test)
    tensor = torch.from_numpy((xs - mean) / std).view(-1, 1, 8, 8)
    return DatasetInfo(
        dataset=TensorClassification(tensor, torch.from_numpy(ys)),
        num_classes=10,
        input_shape=(1, 8, 8),
        name="digits",
        split=split,
        classes=tuple(str(d) for d in range(10)),
    )
