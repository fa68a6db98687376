"""The "tinyimagenet" dataset: a local `tiny-imagenet-200` directory in its standard layout (TINYIMAGENET_LAYOUT),
read in place. Class k is the k-th wnid in sorted order (what the paper's ImageFolder-based loader used).

It cannot be downloaded here: a missing or malformed directory raises DatasetError saying what layout was
expected, what was found, and how to get the data.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from neural_mechanics.errors import DatasetError
from neural_mechanics.experiments.datasets.images import NORMALIZATION, NormalizedImages, describe_dir, indent
from neural_mechanics.experiments.datasets.registry import DataOptions, DatasetInfo

TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_LAYOUT = """tiny-imagenet-200/
    wnids.txt                              one wnid per line (200 lines)
    words.txt                              wnid<TAB>human-readable name (optional)
    train/<wnid>/images/<wnid>_<k>.JPEG    500 images per class
    train/<wnid>/<wnid>_boxes.txt          (not needed)
    val/images/val_<k>.JPEG                10000 images
    val/val_annotations.txt                file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1 per line
    test/images/test_<k>.JPEG              (unlabelled, not used)"""


def _tiny_error(problem: str, root: Path, seen: Path) -> DatasetError:
    return DatasetError(
        f"{problem}\n  expected layout:\n{indent(TINYIMAGENET_LAYOUT)}\n  found: {describe_dir(seen)}",
        f"download {TINYIMAGENET_URL} and unzip it into {root} (so that {root}/tiny-imagenet-200/wnids.txt exists), "
        "or pass root=<the tiny-imagenet-200 directory or its parent>",
    )


def find_tinyimagenet_dir(root: Path) -> Path:
    """`root` itself if it holds wnids.txt, else root/tiny-imagenet-200; DatasetError if neither exists."""
    if (root / "wnids.txt").is_file():
        return root
    nested = root / "tiny-imagenet-200"
    if nested.is_dir():
        if not (nested / "wnids.txt").is_file():
            raise _tiny_error(f"{nested} has no wnids.txt", root, nested)
        return nested
    raise _tiny_error(f"no Tiny ImageNet directory at {root}", root, root)


class TinyImageNet(Dataset[tuple[Tensor, int]]):
    """Tiny ImageNet split read in place (no files are moved): ([0, 1] float 3x64x64 image, class index).

    Class k is the k-th wnid of wnids.txt in sorted order. train: train/<wnid>/images/*.JPEG; val (and test,
    since the official test labels are not public - the paper evaluates on val): val/images per
    val/val_annotations.txt.
    """

    image_size = 64

    def __init__(self, root: str | os.PathLike[str], split: str = "train"):
        self.root = Path(root)
        self.dir = find_tinyimagenet_dir(self.root)
        wnids = [w.strip() for w in (self.dir / "wnids.txt").read_text().splitlines() if w.strip()]
        if not wnids:
            raise _tiny_error(f"{self.dir / 'wnids.txt'} lists no classes", self.root, self.dir)
        self.wnids = tuple(sorted(set(wnids)))
        self.class_index = {w: i for i, w in enumerate(self.wnids)}
        self.names = self._read_words()
        self.split = split
        self.samples = self._train_samples() if split == "train" else self._val_samples()

    def _read_words(self) -> dict[str, str]:
        words = self.dir / "words.txt"
        names: dict[str, str] = {}
        if words.is_file():
            for line in words.read_text(errors="replace").splitlines():
                wnid, _, name = line.partition("\t")
                if wnid in self.class_index:
                    names[wnid] = name.strip()
        return names

    def _train_samples(self) -> list[tuple[Path, int]]:
        train = self.dir / "train"
        if not train.is_dir():
            raise _tiny_error(f"{train} is missing", self.root, self.dir)
        missing = [w for w in self.wnids if not (train / w / "images").is_dir()]
        if missing:
            shown = ", ".join(f"train/{w}/images" for w in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise _tiny_error(
                f"{len(missing)} of the {len(self.wnids)} classes in wnids.txt have no image folder: {shown}{more}",
                self.root,
                train,
            )
        samples: list[tuple[Path, int]] = []
        for w in self.wnids:
            files = sorted(p for p in (train / w / "images").iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
            if not files:
                raise _tiny_error(f"train/{w}/images has no .JPEG files", self.root, train / w / "images")
            samples.extend((p, self.class_index[w]) for p in files)
        return samples

    def _val_samples(self) -> list[tuple[Path, int]]:
        val = self.dir / "val"
        annotations = val / "val_annotations.txt"
        images = val / "images"
        if not annotations.is_file():
            raise _tiny_error(f"{annotations} is missing (it gives each val image's class)", self.root, val)
        if not images.is_dir():
            raise _tiny_error(f"{images} is missing", self.root, val)
        present = {p.name for p in images.iterdir()}
        samples = []
        for lineno, line in enumerate(annotations.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2:
                raise _tiny_error(
                    f"{annotations} line {lineno} is not tab separated (file, wnid, x0, y0, x1, y1): {line!r}",
                    self.root,
                    val,
                )
            name, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in self.class_index:
                raise _tiny_error(f"{annotations} line {lineno}: wnid {wnid!r} is not in wnids.txt", self.root, val)
            if name not in present:
                raise _tiny_error(f"{annotations} line {lineno}: {name} is not in {images}", self.root, images)
            samples.append((images / name, self.class_index[wnid]))
        if not samples:
            raise _tiny_error(f"{annotations} lists no images", self.root, val)
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        # torchvision is imported when an image is read, not at module level: importing it takes ~3 s of CPU (it
        # loads torch._dynamo), which every `nmech` command would pay (the registry imports this module).
        from torchvision.transforms.functional import pil_to_tensor

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")  # a few Tiny ImageNet images are greyscale
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}", "re-download and unzip Tiny ImageNet") from exc
        if rgb.size != (self.image_size, self.image_size):
            raise DatasetError(
                f"{path} is {rgb.size[0]}x{rgb.size[1]}, but Tiny ImageNet images are 64x64",
                "use the unmodified tiny-imagenet-200 release",
            )
        return pil_to_tensor(rgb).float().div(255.0), label


def build_tinyimagenet(split: str, options: DataOptions) -> DatasetInfo:
    """train: train/<wnid>/images; val and test: the labelled val split. Normalised, augmented if asked."""
    base = TinyImageNet(options.root, "train" if split == "train" else "val")
    mean, std = NORMALIZATION["tinyimagenet"]
    return DatasetInfo(
        dataset=NormalizedImages(base, mean, std, augment=options.augment, padding=4, seed=options.seed),
        num_classes=len(base.wnids),
        input_shape=(3, 64, 64),
        name="tinyimagenet",
        split=split,
        classes=base.wnids,
    )
