"""Datasets and the deterministic loader.

Tiny ImageNet and CIFAR are tested on small fixtures written here in their exact on-disk layouts (tiny JPEGs via
PIL, CIFAR pickles with the real key names), including malformed variants. Pixel values are checked against the
raw bytes written (brute-force reference for decoding, channel order and normalisation).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets import (
    NORMALIZATION,
    DatasetInfo,
    NormalizedImages,
    SyntheticImages,
    TensorClassification,
    crop_flip,
    load_dataset,
    make_loader,
)

torch.set_num_threads(1)


def denormalize(x: torch.Tensor, name: str) -> torch.Tensor:
    mean, std = NORMALIZATION[name]
    return x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)


# -- digits ------------------------------------------------------------------------------------


def test_digits_split_is_a_standardised_partition_of_sklearn_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10 and train.name == "digits"
    xs = torch.stack([train.dataset[i][0] for i in range(len(train))])
    assert xs.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert xs.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    labels = [train.dataset[i][1] for i in range(len(train))] + [test.dataset[i][1] for i in range(len(test))]
    assert np.bincount(labels).tolist() == np.bincount(raw.target).tolist()
    # stratified: each class's share of the test split is within one example of 20%
    test_counts = np.bincount([test.dataset[i][1] for i in range(len(test))])
    assert np.all(np.abs(test_counts - 0.2 * np.bincount(raw.target)) <= 1)


def test_digits_recovers_raw_pixels_exactly():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    train_x = np.stack([train.dataset[i][0].numpy().ravel() for i in range(len(train))]).astype(np.float64)
    # raw = std * z + mean; pixel values are integers 0..16, so fit mean/std from two distinct values
    z0 = train_x.min()  # raw 0 maps here
    values = np.unique(np.round(train_x, 4))
    step = values[1] - values[0]  # raw 1 - raw 0
    to_raw = lambda z: np.round((z - z0) / step)  # noqa: E731
    raw_rows = {row.astype(np.int64).tobytes(): int(t) for row, t in zip(raw.data, raw.target, strict=True)}
    for info in (train, test):
        for i in range(len(info)):
            x, y = info.dataset[i]
            key = to_raw(x.numpy().ravel().astype(np.float64)).astype(np.int64).tobytes()
            assert raw_rows[key] == y
    assert len(train) + len(test) == len(raw.data)


def test_digits_split_depends_on_seed_only():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.dataset[5][0], b.dataset[5][0])
    first = torch.stack([a.dataset[i][0] for i in range(20)])
    other = torch.stack([c.dataset[i][0] for i in range(20)])
    assert not torch.equal(first, other)


# -- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_seeded_and_class_dependent():
    info = load_dataset("synthetic", input_shape=(2, 5, 5), num_classes=3, num_samples=300, seed=4)
    assert info.input_shape == (2, 5, 5) and info.num_classes == 3 and len(info) == 300
    again = load_dataset("synthetic", input_shape=(2, 5, 5), num_classes=3, num_samples=300, seed=4)
    for i in (0, 17, 299):
        assert torch.equal(info.dataset[i][0], again.dataset[i][0]) and info.dataset[i][1] == again.dataset[i][1]
    labels = [info.dataset[i][1] for i in range(300)]
    assert np.bincount(labels).tolist() == [100, 100, 100]
    ds = info.dataset
    assert isinstance(ds, SyntheticImages)
    # brute force: class means approach the prototypes (noise std 1, 100 samples -> error ~ 0.1 per entry)
    for k in range(3):
        mean = torch.stack([ds[i][0] for i in range(300) if labels[i] == k]).mean(0)
        assert (mean - ds.prototypes[k]).abs().mean().item() < 0.2
    # x - prototype is the noise, and its reconstruction is exact
    x, y = ds[3]
    gen_noise = x - ds.prototypes[y]
    assert gen_noise.std().item() == pytest.approx(1.0, abs=0.4)


def test_synthetic_train_and_test_differ_but_share_prototypes():
    tr = load_dataset("synthetic", split="train", seed=1)
    te = load_dataset("synthetic", split="test", seed=1)
    assert (len(tr), len(te)) == (512, 128)
    assert torch.equal(tr.dataset.prototypes, te.dataset.prototypes)  # type: ignore[attr-defined]
    assert not torch.equal(tr.dataset[0][0], te.dataset[0][0])


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(DatasetError, match="positive sizes"):
        load_dataset("synthetic", num_samples=0)


def test_unknown_dataset_and_split():
    with pytest.raises(DatasetError, match="did you mean cifar10"):
        load_dataset("cifar11")
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("digits", split="dev")  # type: ignore[arg-type]


# -- augmentation ------------------------------------------------------------------------------


def test_crop_flip_is_a_crop_of_the_padded_image_possibly_flipped():
    image = torch.rand(3, 6, 6)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    candidates = [padded[:, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
    candidates += [c.flip(-1) for c in candidates]
    seen_flip = seen_shift = False
    for seed in range(40):
        out = crop_flip(image, 2, torch.Generator().manual_seed(seed))
        matches = [k for k, c in enumerate(candidates) if torch.equal(out, c)]
        assert matches
        seen_flip |= matches[0] >= 25
        seen_shift |= matches[0] % 25 != 12
    assert seen_flip and seen_shift


def test_normalized_images_augmentation_depends_on_seed_epoch_index():
    base = TensorClassification(torch.rand(4, 3, 8, 8), torch.arange(4))
    ds = NormalizedImages(base, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), augment=True, seed=3)
    a = ds[1][0]
    assert torch.equal(a, ds[1][0])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[1][0]) or not torch.equal(a, ds[2][0])
    plain = NormalizedImages(base, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(plain[2][0], (base[2][0] - 0.5) / 0.25)


# -- Tiny ImageNet fixture ---------------------------------------------------------------------

WNIDS = ["n02", "n01", "n03"]  # deliberately unsorted in wnids.txt; classes follow sorted order


def color(k: int, j: int) -> tuple[int, int, int]:
    return (40 * k + 10, 200 - 30 * j, 60 + 50 * k)


def write_jpeg(path: Path, rgb: tuple[int, int, int], size: int = 64, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), rgb)
    if mode == "L":
        img = img.convert("L")
    img.save(path, format="JPEG", quality=100)


def make_tiny(root: Path, per_class: int = 2) -> Path:
    """A tiny-imagenet-200 directory in the official layout: 3 classes, `per_class` train images each, 4 val."""
    d = root / "tiny-imagenet-200"
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (d / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby cat\nn03\ttower\nn99\tunused\n")
    for w in WNIDS:
        k = sorted(WNIDS).index(w)
        for j in range(per_class):
            write_jpeg(d / "train" / w / "images" / f"{w}_{j}.JPEG", color(k, j))
        (d / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t63\t63\n")
    val_labels = ["n03", "n01", "n02", "n01"]
    lines = []
    for i, w in enumerate(val_labels):
        write_jpeg(d / "val" / "images" / f"val_{i}.JPEG", color(sorted(WNIDS).index(w), 5))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    write_jpeg(d / "test" / "images" / "test_0.JPEG", (1, 2, 3))
    return d


def test_tinyimagenet_train_labels_and_pixels(tmp_path):
    make_tiny(tmp_path)
    info = load_dataset("tinyimagenet", tmp_path, split="train", augment=False)
    assert isinstance(info, DatasetInfo)
    assert info.num_classes == 3 and info.input_shape == (3, 64, 64) and len(info) == 6
    assert info.classes == ("n01", "n02", "n03")
    seen = set()
    for i in range(len(info)):
        x, y = info.dataset[i]
        assert x.shape == (3, 64, 64)
        pixels = denormalize(x, "tinyimagenet") * 255
        # the file for (class y, image j) was a solid colour(y, j); JPEG of a solid colour is within a few levels
        matches = [j for j in range(2) if (pixels - torch.tensor(color(y, j)).view(3, 1, 1)).abs().max() < 3]
        assert len(matches) == 1
        seen.add((y, matches[0]))
    assert seen == {(k, j) for k in range(3) for j in range(2)}


def test_tinyimagenet_val_uses_annotations(tmp_path):
    make_tiny(tmp_path)
    for split in ("val", "test"):  # Tiny ImageNet's test labels are not public; test = the labelled val split
        info = load_dataset("tinyimagenet", tmp_path, split=split)
        labels = [info.dataset[i][1] for i in range(len(info))]
        assert labels == [2, 0, 1, 0]
        x, _ = info.dataset[0]
        pixels = denormalize(x, "tinyimagenet") * 255
        assert (pixels - torch.tensor(color(2, 5)).view(3, 1, 1)).abs().max() < 3


def test_tinyimagenet_root_may_be_the_directory_itself_and_greyscale_is_converted(tmp_path):
    d = make_tiny(tmp_path)
    write_jpeg(d / "train" / "n01" / "images" / "n01_9.JPEG", (90, 90, 90), mode="L")
    info = load_dataset("tinyimagenet", d, split="train", augment=False)
    assert len(info) == 7
    grey = [i for i, (path, _) in enumerate(info.dataset.base.samples) if path.name == "n01_9.JPEG"]  # type: ignore[attr-defined]
    x, y = info.dataset[grey[0]]
    assert x.shape == (3, 64, 64) and y == 0
    pixels = denormalize(x, "tinyimagenet") * 255
    assert (pixels - 90).abs().max() < 3  # grey replicated to three channels
    words = info.dataset.base.names  # type: ignore[attr-defined]
    assert words["n02"] == "tabby cat" and "n99" not in words


def test_tinyimagenet_augmented_train_is_crop_flip_of_the_plain_image(tmp_path):
    make_tiny(tmp_path)
    plain = load_dataset("tinyimagenet", tmp_path, split="train", augment=False)
    aug = load_dataset("tinyimagenet", tmp_path, split="train", seed=5)  # augment defaults on for train
    base = plain.dataset.base  # type: ignore[attr-defined]
    raw, _ = base[0]
    x, _ = aug.dataset[0]
    restored = denormalize(x, "tinyimagenet")
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    cands = [padded[:, i : i + 64, j : j + 64] for i in range(9) for j in range(9)]
    cands += [c.flip(-1) for c in cands]
    assert min((restored - c).abs().max().item() for c in cands) < 1e-5


@pytest.mark.parametrize(
    ("breakage", "split", "match"),
    [
        ("no_annotations", "val", "val_annotations.txt is missing"),
        ("no_wnid_folder", "train", "n02/images"),
        ("empty_dir", "train", "is empty"),
        ("missing_dir", "train", "does not exist"),
        ("unknown_wnid", "val", "not in wnids.txt"),
        ("missing_val_image", "val", "val_1.JPEG is not in"),
        ("no_tabs", "val", "not tab separated"),
        ("empty_wnids", "train", "lists no classes"),
    ],
)
def test_tinyimagenet_malformed(tmp_path, breakage, split, match):
    root = tmp_path / "data"
    if breakage == "empty_dir":
        (root / "tiny-imagenet-200").mkdir(parents=True)
        (root / "tiny-imagenet-200" / "wnids.txt").write_text("")
        root = tmp_path / "empty"
        root.mkdir()
    elif breakage != "missing_dir":
        d = make_tiny(root)
        ann = d / "val" / "val_annotations.txt"
        if breakage == "no_annotations":
            ann.unlink()
        elif breakage == "no_wnid_folder":
            import shutil

            shutil.rmtree(d / "train" / "n02")
        elif breakage == "unknown_wnid":
            ann.write_text(ann.read_text().replace("n03", "n77", 1))
        elif breakage == "missing_val_image":
            (d / "val" / "images" / "val_1.JPEG").unlink()
        elif breakage == "no_tabs":
            ann.write_text(ann.read_text().replace("\t", " "))
        elif breakage == "empty_wnids":
            (d / "wnids.txt").write_text("\n")
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset("tinyimagenet", root, split=split)
    text = str(info.value)
    assert "tiny-imagenet-200.zip" in text and "val_annotations.txt" in text  # how to get it + the layout


def test_tinyimagenet_wrong_image_size(tmp_path):
    d = make_tiny(tmp_path)
    write_jpeg(d / "val" / "images" / "val_0.JPEG", (1, 2, 3), size=32)
    info = load_dataset("tinyimagenet", tmp_path, split="val")
    with pytest.raises(DatasetError, match="64x64"):
        info.dataset[0]


def test_default_root_from_environment(tmp_path, monkeypatch):
    make_tiny(tmp_path)
    monkeypatch.setenv("NMECH_DATA", str(tmp_path))
    assert len(load_dataset("tinyimagenet", split="val")) == 4


# -- CIFAR fixture -----------------------------------------------------------------------------


def cifar_rows(n: int, offset: int) -> np.ndarray:
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def make_cifar10(root: Path, n: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    written = {}
    for b, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]):
        data, labels = cifar_rows(n, b), [(b + i) % 10 for i in range(n)]
        with open(d / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": ["x.png"] * n}, f)
        written[name] = (data, labels)
    data, labels = cifar_rows(n, 99), [9 - i for i in range(n)]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": labels, "data": data}, f)
    written["test_batch"] = (data, labels)
    with open(d / "batches.meta", "wb") as f:
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        pickle.dump({"num_cases_per_batch": n, "label_names": names, "num_vis": 3072}, f)
    return written


def make_cifar100(root: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    written = {}
    for name, seed in (("train", 1), ("test", 2)):
        data, fine = cifar_rows(n, seed), [(37 * i + seed) % 100 for i in range(n)]
        with open(d / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]}, f)
        written[name] = (data, fine)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": list("x" * 20)}, f)
    return written


def reference_image(row: np.ndarray) -> torch.Tensor:
    """CIFAR row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major."""
    out = torch.empty(3, 32, 32)
    for c in range(3):
        for h in range(32):
            out[c, h] = torch.from_numpy(row[c * 1024 + h * 32 : c * 1024 + h * 32 + 32].astype(np.float32))
    return out / 255.0


def test_cifar10_fixture_pixels_and_labels(tmp_path):
    written = make_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, split="train", augment=False)
    assert len(train) == 15 and train.num_classes == 10 and train.input_shape == (3, 32, 32)
    assert train.classes[0] == "airplane"
    for batch, k in [("data_batch_1", 0), ("data_batch_3", 2), ("data_batch_5", 1)]:
        index = int(batch[-1]) * 3 - 3 + k
        x, y = train.dataset[index]
        data, labels = written[batch]
        assert y == labels[k]
        assert torch.allclose(denormalize(x, "cifar10"), reference_image(data[k]), atol=1e-5)
    test = load_dataset("cifar10", tmp_path, split="test")
    x, y = test.dataset[2]
    data, labels = written["test_batch"]
    assert y == labels[2]
    assert torch.allclose(denormalize(x, "cifar10"), reference_image(data[2]), atol=1e-5)


def test_cifar100_fixture_fine_labels(tmp_path):
    written = make_cifar100(tmp_path)
    info = load_dataset("cifar100", tmp_path / "cifar-100-python", split="val")  # the batches dir itself works
    data, fine = written["test"]
    assert info.num_classes == 100 and len(info) == 4
    assert [info.dataset[i][1] for i in range(4)] == fine
    assert torch.allclose(denormalize(info.dataset[3][0], "cifar100"), reference_image(data[3]), atol=1e-5)


def test_cifar_missing_batch(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing data_batch_3") as info:
        load_dataset("cifar10", tmp_path)
    assert "download=True" in str(info.value) and "test_batch" in str(info.value)


def test_cifar_missing_dir_and_empty_dir(tmp_path):
    with pytest.raises(DatasetError, match="no cifar-100-python directory"):
        load_dataset("cifar100", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("cifar10", tmp_path / "nowhere")


def test_cifar_corrupt_pickle(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="could not read cifar10"):
        load_dataset("cifar10", tmp_path)


def test_cifar_wrong_row_length(tmp_path):
    make_cifar100(tmp_path)
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), dtype=np.uint8), "fine_labels": [0, 1]}, f)
    with pytest.raises(DatasetError):
        load_dataset("cifar100", tmp_path, split="test")


def test_cifar_checksum_verification_rejects_fixture(tmp_path):
    make_cifar10(tmp_path)
    with pytest.raises(DatasetError, match="could not read"):
        load_dataset("cifar10", tmp_path, verify_checksums=True)


# -- loader ------------------------------------------------------------------------------------


def batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def test_loader_is_a_function_of_seed_and_epoch():
    info = load_dataset("synthetic", num_samples=40, input_shape=(1, 2, 2), num_classes=4)
    l1, l2 = make_loader(info, 8, seed=3), make_loader(info, 8, seed=3)
    e0, e1 = batches(l1), batches(l1)
    assert same(e0, batches(l2)) and same(e1, batches(l2))
    assert not same(e0, e1)
    l2.set_epoch(0)
    assert same(e0, batches(l2))
    assert not same(e0, batches(make_loader(info, 8, seed=4)))
    # every example exactly once per epoch
    ys = torch.cat([y for _, y in e1])
    assert len(ys) == 40
    xs = torch.cat([x for x, _ in e1]).flatten(1)
    assert len({tuple(r.tolist()) for r in xs}) == 40


def test_loader_without_shuffle_keeps_order():
    info = load_dataset("synthetic", num_samples=10, input_shape=(3,), num_classes=2)
    x, _ = next(iter(make_loader(info, 10, shuffle=False)))
    assert torch.equal(x, torch.stack([info.dataset[i][0] for i in range(10)]))


def test_loader_with_workers_matches_main_process_including_augmentation(tmp_path):
    make_cifar10(tmp_path, n=4)
    info = load_dataset("cifar10", tmp_path, split="train", seed=2)  # augmented
    main = make_loader(info, 6, seed=1, num_workers=0)
    workers = make_loader(info, 6, seed=1, num_workers=2)
    assert same(batches(main), batches(workers))
    assert same(batches(main), batches(workers))  # epoch 1 as well


def test_loader_shards_are_disjoint_under_ddp():
    info = load_dataset("synthetic", num_samples=20, input_shape=(3,), num_classes=2)
    shards = [batches(make_loader(info, 4, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    rows = [{tuple(x.tolist()) for b in s for x in b[0]} for s in shards]
    assert len(rows[0]) == len(rows[1]) == 10 and not rows[0] & rows[1]


def test_loader_rejects_bad_batch_size():
    with pytest.raises(DatasetError, match="batch_size"):
        make_loader(load_dataset("digits"), 0)
