"""Datasets users bring: image folders, dataset factories, token streams, and configurable synthetic data.

Image folders are written here as tiny PNGs (lossless, so decoded pixels can be compared with the bytes written);
the expected labels, splits, pixels and normalisation statistics are recomputed directly from the files (PIL,
NumPy), never taken from the code under test. Token windows are compared with the corpus bytes read directly.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neural_mechanics.errors import ConfigError, DatasetError
from neural_mechanics.experiments.config import load_config
from neural_mechanics.experiments.datasets import load_dataset, make_loader
from neural_mechanics.experiments.datasets.imagefolder import held_out_indices
from neural_mechanics.experiments.datasets.synthetic import BLOCK

torch.set_num_threads(1)


# -- image folders ---------------------------------------------------------------------------------------------


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def image_tree(root: Path, counts: dict[str, int], size: tuple[int, int] = (6, 5), seed: int = 0) -> dict[str, int]:
    """Class folders with `counts[cls]` random RGB PNGs of size (H, W); returns path -> class index (sorted names)."""
    rng = np.random.default_rng(seed)
    labels = {}
    for k, cls in enumerate(sorted(counts)):
        for j in range(counts[cls]):
            path = root / cls / f"img{j:02d}.png"
            write_png(path, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            labels[str(path)] = k
    return labels


def pixels(path: str, mode: str = "RGB") -> torch.Tensor:
    """A file's pixels as C x H x W floats in [0, 1], read with PIL directly."""
    arr = np.asarray(Image.open(path).convert(mode), dtype=np.float64) / 255.0
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr).permute(2, 0, 1)


def test_imagefolder_labels_pixels_and_measured_normalisation(tmp_path):
    labels = image_tree(tmp_path, {"cat": 5, "ant": 4, "bee": 6})
    train = load_dataset("imagefolder", tmp_path, split="train", augment=False, seed=1)
    test = load_dataset("imagefolder", tmp_path, split="test", seed=1)
    assert train.classes == ("ant", "bee", "cat") and train.num_classes == 3 and train.input_shape == (3, 6, 5)
    # the statistics are those of every pixel of every training image (fewer than STATS_IMAGES), per channel
    stack = torch.stack([pixels(p) for p, _ in train.dataset.base.samples])
    mean, std = stack.mean(dim=(0, 2, 3)), stack.std(dim=(0, 2, 3), unbiased=False)
    for info in (train, test):
        assert torch.allclose(info.dataset.mean.flatten().double(), mean, atol=1e-6)
        assert torch.allclose(info.dataset.std.flatten().double(), std, atol=1e-6)
        for i in range(len(info)):
            x, y = info.dataset[i]
            path, label = info.dataset.base.samples[i]
            assert y == label == labels[path]
            expected = (pixels(path) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
            assert torch.allclose(x.double(), expected, atol=1e-5)
    # a partition of all images, stratified: round(0.2 n) of each class held out, at most n - 1
    train_paths = {p for p, _ in train.dataset.base.samples}
    test_paths = {p for p, _ in test.dataset.base.samples}
    assert train_paths.isdisjoint(test_paths) and train_paths | test_paths == set(labels)
    held = [labels[p] for p in test_paths]
    assert sorted(held) == [0, 1, 2]  # ant 4 -> 1 (0.8), bee 6 -> 1 (1.2), cat 5 -> 1
    assert "imagefolder" in train.notes[0]


def test_held_out_split_is_seeded_stratified_and_keeps_a_training_image():
    labels = [0] * 10 + [1] * 3 + [2] * 1
    a, b = held_out_indices(labels, 0.3, seed=0), held_out_indices(labels, 0.3, seed=0)
    assert a == b
    per_class = [sum(1 for i in a if labels[i] == c) for c in range(3)]
    assert per_class == [3, 1, 0]  # round(3.0), round(0.9), min(round(0.3), 0)
    others = {tuple(held_out_indices(labels, 0.3, seed=s)) for s in range(6)}
    assert len(others) > 1  # the seed chooses which images


def test_imagefolder_train_and_val_directories_resize_and_greyscale(tmp_path):
    image_tree(tmp_path / "train", {"a": 3, "b": 2}, size=(7, 9))
    val = image_tree(tmp_path / "val", {"a": 1, "b": 2}, size=(4, 4), seed=5)
    info = load_dataset("imagefolder", tmp_path, split="val", image_size=(8,), channels=1, mean=(0.5,), std=(0.25,))
    assert len(info) == 3 and info.input_shape == (1, 8, 8)
    for i in range(3):
        x, y = info.dataset[i]
        path = info.dataset.base.samples[i][0]
        assert y == val[path]
        resized = Image.open(path).convert("L").resize((8, 8), Image.Resampling.BILINEAR)
        expected = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None]
        assert torch.allclose(x, (expected - 0.5) / 0.25, atol=1e-5)
    # "test" falls back to val/ when there is no test/; train/ is read whole
    assert len(load_dataset("imagefolder", tmp_path, split="test", image_size=(8,))) == 3
    assert len(load_dataset("imagefolder", tmp_path, split="train", image_size=(8,))) == 5
    # train/ alone: the held-out part comes from it, as for a bare class tree
    image_tree(tmp_path / "only" / "train", {"a": 5, "b": 5})
    parts = [load_dataset("imagefolder", tmp_path / "only", split=s, mean=(0, 0, 0), std=(1, 1, 1)) for s in
             ("train", "test")]
    assert [len(p) for p in parts] == [8, 2]
    assert {q for p in parts for q, _ in p.dataset.base.samples} == {str(f) for f in (tmp_path / "only").rglob("*.png")}


def test_imagefolder_trains_deterministically_through_the_seeded_loader(tmp_path):
    image_tree(tmp_path, {"a": 6, "b": 6}, size=(8, 8))
    info = load_dataset("imagefolder", tmp_path, split="train", seed=3)  # augmented (crop + flip)
    first = [torch.cat([x.flatten(), y.float()]) for x, y in make_loader(info, 4, seed=3)]
    again = load_dataset("imagefolder", tmp_path, split="train", seed=3)
    second = [torch.cat([x.flatten(), y.float()]) for x, y in make_loader(again, 4, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    shards = [make_loader(info, 2, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [i for s in shards for i in s.sampler]
    assert sorted(seen) == list(range(len(info)))  # DDP ranks read disjoint shards of every epoch


@pytest.mark.parametrize(
    ("setup", "split", "match"),
    [
        (lambda root: None, "train", "no image folder"),
        (lambda root: root.mkdir(), "train", "no class folders"),
        (lambda root: (root / "a").mkdir(parents=True), "train", "Found no valid file|holds no image"),
        (lambda root: (image_tree(root / "train", {"a": 2}), image_tree(root / "val", {"zzz": 1})), "val",
         "class folders the training split lacks"),
        (lambda root: image_tree(root, {"a": 1, "b": 1}), "test", "no test images"),
    ],
    ids=["missing", "empty", "class-without-images", "val-class-not-in-train", "nothing-held-out"],
)
def test_imagefolder_malformed_layouts_say_what_was_expected(tmp_path, setup, split, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset("imagefolder", root, split=split)
    assert "expected layout" in info.value.what and info.value.fix


def test_imagefolder_images_of_different_sizes_need_image_size(tmp_path):
    write_png(tmp_path / "a" / "x.png", np.zeros((4, 4, 3), np.uint8))
    write_png(tmp_path / "a" / "y.png", np.zeros((5, 4, 3), np.uint8))
    write_png(tmp_path / "b" / "z.png", np.zeros((4, 4, 3), np.uint8))
    info = load_dataset("imagefolder", tmp_path, split="train", test_fraction=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    with pytest.raises(DatasetError, match=r"set dataset\.image_size"):
        [info.dataset[i] for i in range(len(info))]
    ok = load_dataset("imagefolder", tmp_path, split="train", test_fraction=0.0, image_size=(4, 4))
    assert all(ok.dataset[i][0].shape == (3, 4, 4) for i in range(3))


def test_imagefolder_config_keys_are_checked(tmp_path):
    assert load_config("demo", ["dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.image_size=32"]
                       ).dataset.image_size == (32,)
    with pytest.raises(ConfigError, match="imagefolder does not read seq_len"):
        load_config("demo", ["dataset=imagefolder", "dataset.seq_len=8"])
    with pytest.raises(ConfigError, match="channels"):
        load_config("demo", ["dataset=imagefolder", "dataset.channels=0"])


# -- dataset factories -----------------------------------------------------------------------------------------

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch.utils.data import Dataset, TensorDataset

    class Points(Dataset):
        classes = ("left", "right")

        def __init__(self, n=20, offset=0):
            self.x = torch.arange(n * 3, dtype=torch.float32).view(n, 3) + offset
            self.y = torch.arange(n) % 2

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    def one():
        return Points(20)

    def pair():
        return Points(12), Points(5, offset=1000)

    def mapping(seed):
        return {"train": Points(10), "val": Points(3, offset=500), "test": Points(4, offset=900)}

    def by_split(split):
        return Points(8 if split == "train" else 2, offset=0 if split == "train" else 700)

    def tensors():
        ds = TensorDataset(torch.randn(9, 2), torch.arange(9) % 3)
        ds.num_classes = 3
        return ds

    def dicts():
        return [{"x": torch.zeros(2), "y": 0}] * 4

    def not_a_dataset():
        return 42

    def broken():
        raise OSError("disk on fire")
    """
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A user module `nm_user_data_<n>` importable from the current directory (tmp_path), removed afterwards."""
    name = f"nm_user_data_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])  # only the cwd rule may find it
    yield name
    sys.modules.pop(name, None)


def test_factory_returning_one_dataset_holds_out_a_seeded_part(factories):
    train = load_dataset(f"{factories}:one", split="train", seed=0)
    test = load_dataset(f"{factories}:one", split="test", seed=0)
    assert len(train) == 16 and len(test) == 4  # round(0.2 * 20)
    firsts = {float(train.dataset[i][0][0]) for i in range(16)} | {float(test.dataset[i][0][0]) for i in range(4)}
    assert firsts == {3.0 * i for i in range(20)}  # a partition of the 20 items
    assert train.num_classes == 2 and train.input_shape == (3,) and train.name == f"{factories}:one"
    other = load_dataset(f"{factories}:one", split="test", seed=1)
    assert {float(other.dataset[i][0][0]) for i in range(4)} != {float(test.dataset[i][0][0]) for i in range(4)}


@pytest.mark.parametrize(
    ("attr", "sizes", "eval_offset"),
    [("pair", (12, 5, 5), 1000), ("mapping", (10, 3, 4), None), ("by_split", (8, 2, 2), 700)],
    ids=["pair", "mapping", "split-argument"],
)
def test_factory_forms_give_their_own_splits(factories, attr, sizes, eval_offset):
    got = tuple(len(load_dataset(f"{factories}:{attr}", split=s)) for s in ("train", "val", "test"))
    assert got == sizes
    if eval_offset is not None:
        assert float(load_dataset(f"{factories}:{attr}", split="test").dataset[0][0][0]) == eval_offset
    else:  # the mapping's own val and test
        assert float(load_dataset(f"{factories}:mapping", split="val").dataset[0][0][0]) == 500
        assert float(load_dataset(f"{factories}:mapping", split="test").dataset[0][0][0]) == 900


def test_factory_class_count_from_attributes(factories):
    assert load_dataset(f"{factories}:tensors", split="train").num_classes == 3  # num_classes attribute
    assert load_dataset(f"{factories}:Points", split="train").num_classes == 2  # a Dataset class, its `classes`


@pytest.mark.parametrize(
    ("attr", "match"),
    [("dicts", "must be \\(input, target\\) pairs, item 0 is a dict"), ("not_a_dataset", "returned a int"),
     ("broken", "raised OSError: disk on fire"), ("nope", "has no attribute")],
    ids=["dict-items", "not-a-dataset", "raises", "missing"],
)
def test_factory_errors_say_what_to_return(factories, attr, match):
    with pytest.raises(DatasetError, match=match):
        load_dataset(f"{factories}:{attr}", split="train")


def test_factory_in_a_config_is_imported_when_the_config_loads(factories):
    cfg = load_config("demo", [f"dataset.name={factories}:one", "dataset.test_fraction=0.5"])
    assert cfg.dataset.name == f"{factories}:one"
    with pytest.raises(ConfigError, match=r"cannot import module 'no_such_user_pkg\.data'"):
        load_config("demo", ["dataset.name=no_such_user_pkg.data:build"])
    with pytest.raises(ConfigError, match="does not read image_size"):
        load_config("demo", [f"dataset.name={factories}:one", "dataset.image_size=4"])


# -- token streams ---------------------------------------------------------------------------------------------


def descr_bytes() -> bytes:
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.rst")))


def test_embedded_corpus_windows_are_the_corpus_bytes_shifted_by_one():
    data = descr_bytes()
    train = load_dataset("tokens", split="train", seq_len=16, test_fraction=0.25)
    test = load_dataset("tokens", split="test", seq_len=16, test_fraction=0.25)
    cut = int(len(data) * 0.75)
    assert train.num_classes == 256 and train.input_shape == (16,)
    assert len(train) == (cut - 1) // 16 and len(test) == (len(data) - cut - 1) // 16
    for info, offset in ((train, 0), (test, cut)):
        for i in (0, 1, len(info) - 1):
            x, y = info.dataset[i]
            start = offset + 16 * i
            assert bytes(x.tolist()) == data[start : start + 16] and bytes(y.tolist()) == data[start + 1 : start + 17]
    assert "sha256" in train.notes[0] and str(len(data)) in train.notes[0]


def test_token_files_text_pt_and_npy(tmp_path):
    (tmp_path / "t.txt").write_bytes("héllo wörld, ".encode() * 10)
    info = load_dataset("tokens", path=tmp_path / "t.txt", split="train", seq_len=8, test_fraction=0.0)
    assert info.num_classes == 256 and bytes(info.dataset[0][0].tolist()) == "héllo wörld, ".encode()[:8]
    ids = torch.arange(100) % 37
    torch.save(ids, tmp_path / "ids.pt")
    np.save(tmp_path / "ids.npy", ids.numpy().astype(np.int32))
    for name in ("ids.pt", "ids.npy"):
        info = load_dataset("tokens", path=tmp_path / name, split="test", seq_len=4, test_fraction=0.5)
        assert info.num_classes == 37 and len(info) == 12  # (50 - 1) // 4
        x, y = info.dataset[2]
        assert x.tolist() == [(50 + 8 + k) % 37 for k in range(4)] and y.tolist() == [(50 + 9 + k) % 37 for k in
                                                                                      range(4)]
    assert load_dataset("tokens", path=tmp_path / "ids.pt", vocab_size=64, seq_len=4).num_classes == 64


@pytest.mark.parametrize(
    ("content", "extra", "match"),
    [(torch.ones(3, 3, dtype=torch.long), {}, "not a 1-D integer tensor"),
     (torch.rand(30), {}, "not a 1-D integer tensor"),
     (torch.tensor([1, -2, 3] * 10), {}, "negative token ids"),
     (torch.arange(50), {"vocab_size": 10}, "vocab_size to at least 50"),
     (torch.arange(5), {}, "fewer than seq_len"),
     ({"ids": torch.arange(5)}, {}, "holds dict")],
    ids=["2d", "float", "negative", "vocab-too-small", "too-short", "a-dict"],
)
def test_bad_token_files(tmp_path, content, extra, match):
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(DatasetError, match=match):
        load_dataset("tokens", path=tmp_path / "bad.pt", seq_len=8, **extra)
    with pytest.raises(DatasetError, match="no token file"):
        load_dataset("tokens", path=tmp_path / "missing.txt")


# -- synthetic data of any shape, dtype and target ---------------------------------------------------------------


def test_synthetic_per_pixel_targets_are_blocky_label_maps_and_inputs_follow_them():
    info = load_dataset("synthetic", split="train", targets="pixel", input_shape=(2, 10, 7), num_classes=3,
                        num_samples=6)
    proto = info.dataset.prototypes  # (classes, channels)
    for i in range(6):
        x, y = info.dataset[i]
        assert x.shape == (2, 10, 7) and y.shape == (10, 7) and y.dtype == torch.long
        assert int(y.min()) >= 0 and int(y.max()) < 3
        for r in range(10):  # constant on BLOCK x BLOCK squares
            for c in range(7):
                assert y[r, c] == y[r - r % BLOCK, c - c % BLOCK]
        # x = mu_y + standard normal noise: subtracting the prototypes leaves unit-variance noise
        residual = x - proto[y].permute(2, 0, 1)
        assert 0.5 < float(residual.std()) < 1.6
    again = load_dataset("synthetic", split="train", targets="pixel", input_shape=(2, 10, 7), num_classes=3,
                         num_samples=6)
    assert all(torch.equal(info.dataset[i][1], again.dataset[i][1]) for i in range(6))


def test_synthetic_regression_is_linear_in_the_input():
    info = load_dataset("synthetic", split="train", targets="regression", input_shape=(5,), num_classes=2,
                        num_samples=400)
    xs = torch.stack([info.dataset[i][0] for i in range(400)])
    ys = torch.stack([info.dataset[i][1] for i in range(400)])
    fit = torch.linalg.lstsq(xs.double(), ys.double()).solution
    residual = ys.double() - xs.double() @ fit
    assert torch.allclose(fit.T, info.dataset.weight.double(), atol=0.03)
    assert 0.07 < float(residual.std()) < 0.13  # the 0.1 noise
    assert info.num_classes == 2 and ys.dtype == torch.float32


def test_synthetic_tokens_classes_and_markov_next_tokens():
    cls = load_dataset("synthetic", split="train", dtype="long", input_shape=(12,), num_classes=4, vocab_size=30,
                       num_samples=40)
    x, y = cls.dataset[0]
    assert x.dtype == torch.long and x.shape == (12,) and int(x.min()) >= 0 and int(x.max()) < 30
    agree = torch.stack([(cls.dataset[i][0] == cls.dataset.prototypes[cls.dataset[i][1]]).float() for i in range(40)])
    assert 0.45 < float(agree.mean()) < 0.65  # kept with probability 1/2, plus chance agreement 1/30
    nxt = load_dataset("synthetic", split="train", dtype="long", targets="next_token", input_shape=(9,),
                       vocab_size=11, num_samples=20)
    assert nxt.num_classes == 11 and nxt.input_shape == (9,)
    succ = nxt.dataset.successors
    for i in range(20):
        x, y = nxt.dataset[i]
        assert torch.equal(x[1:], y[:-1])  # y is x shifted by one
        walk = [*x.tolist(), int(y[-1])]
        assert all(b in succ[a].tolist() for a, b in itertools.pairwise(walk))


def test_synthetic_float64_inputs_and_config_validation():
    x, _ = load_dataset("synthetic", split="test", dtype="float64", input_shape=(4,), num_samples=2).dataset[0]
    assert x.dtype == torch.float64
    ok = load_config("demo", ["dataset=synthetic", "dataset.dtype=long", "dataset.targets=next_token",
                              "dataset.input_shape=[16]", "dataset.vocab_size=50"])
    assert ok.dataset.input_shape == (16,)
    bad = [
        (["dataset.dtype=long", "dataset.targets=pixel"], "cannot have pixel targets"),
        (["dataset.dtype=long", "dataset.targets=next_token"], "one sequence"),
        (["dataset.targets=pixel", "dataset.input_shape=[8]"], "channels, \\*positions"),
        (["dataset.seq_len=8"], "synthetic does not read seq_len"),
        (["dataset.num_classes=0"], "must be >= 1"),
        (["dataset.dtype=int8"], "expected 'float32' \\| 'float64' \\| 'long'"),
    ]
    for overrides, match in bad:
        with pytest.raises(ConfigError, match=match):
            load_config("demo", ["dataset=synthetic", *overrides])
    # the keys digits and synthetic always tolerated still load
    assert load_config("demo", ["dataset=synthetic", "dataset.root=/x", "dataset.augment=true"])
