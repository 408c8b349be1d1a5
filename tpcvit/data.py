"""Datasets and loaders: ImageNet-layout folders, idx files (Fashion-MNIST / MNIST format), timm transforms.

Every dataset yields ``(PIL image, label)``; :func:`build_transform` converts each image to the model's channel
count (grayscale, RGBA, palette all work) and size, so any dataset of these kinds feeds any model.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .errors import TpcvitError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(TpcvitError):
    """Missing or unusable data (the message says how to fix it)."""


# ----------------------------------------------------------------------------------------------------------
# idx format (MNIST, Fashion-MNIST, KMNIST, ...)
# ----------------------------------------------------------------------------------------------------------
def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array (magic number checked)."""
    path = Path(path)
    try:
        return _read_idx(path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path} is truncated or not a valid gzip file ({err}): re-download or unpack it") from None


def _read_idx(path: Path) -> np.ndarray:
    with _open_maybe_gz(path) as fh:
        header = fh.read(4)
        if len(header) != 4 or header[:2] != b"\x00\x00":
            raise DataError(f"{path} is not an idx file (bad magic number)")
        dtype_code, ndim = header[2], header[3]
        dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
        if dtype_code not in dtypes:
            raise DataError(f"{path}: unknown idx data type 0x{dtype_code:02x}")
        shape = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
        data = np.frombuffer(fh.read(), dtype=dtypes[dtype_code])
    expected = int(np.prod(shape))
    if data.size != expected:
        raise DataError(f"{path} is truncated: {data.size} values, header says {expected} {shape}")
    return data.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


class IdxDataset(Dataset):
    """An idx image/label pair (``train-images-idx3-ubyte[.gz]`` etc.) as ``(PIL image, label)``."""

    SPLITS = {"train": "train", "val": "t10k", "test": "t10k"}

    def __init__(self, root: str | os.PathLike, split: str = "train", transform=None,
                 limit: int | None = None, classes: tuple[str, ...] | None = None) -> None:
        root = Path(root)
        if split not in self.SPLITS:
            raise DataError(f"split must be one of {list(self.SPLITS)}, got {split!r}")
        prefix = self.SPLITS[split]
        images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        if images is None or labels is None:
            hint = ("install it with `apt-get install dataset-fashion-mnist`"
                    if str(root) == FASHION_MNIST_DIR else "point data.path at a folder holding them")
            raise DataError(f"idx dataset not found: {root} has no {prefix}-images-idx3-ubyte[.gz] / "
                            f"{prefix}-labels-idx1-ubyte[.gz]; {hint}")
        self.images = read_idx(images)
        self.labels = read_idx(labels).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{images} has {len(self.images)} images but {labels} {len(self.labels)} labels")
        if limit is not None:
            # a class-balanced, deterministic subset (first `limit` in a fixed permutation)
            order = np.random.default_rng(0).permutation(len(self.labels))[:limit]
            self.images, self.labels = self.images[order], self.labels[order]
        self.num_classes = int(self.labels.max()) + 1 if classes is None else len(classes)
        self.classes = classes or tuple(str(i) for i in range(self.num_classes))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def load_image(path: str | os.PathLike, dataset: bool = True) -> Image.Image:
    """Open and fully decode an image; corrupt/truncated files raise :class:`DataError` naming the file (and, for
    a ``dataset`` image, the ``data.skip_corrupt`` switch)."""
    if not Path(path).is_file():
        raise DataError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.copy()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as err:
        fix = ", or set data.skip_corrupt: true to skip such files" if dataset else ""
        raise DataError(f"corrupt, oversized or unreadable image {path}: {err}. Remove or replace it{fix}") from err


def list_images(paths: list[str]) -> list[Path]:
    """Image files among ``paths`` (files, or folders searched recursively), sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            found.append(p)
        else:
            raise DataError(f"no such image file or folder: {p}")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {paths}")
    return found


# ----------------------------------------------------------------------------------------------------------
# image folders (ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg)
# ----------------------------------------------------------------------------------------------------------
def class_folders(root: Path) -> tuple[str, ...]:
    """Class names of an image folder: its sub-folders, sorted; hidden ones (``.ipynb_checkpoints``) ignored."""
    classes = tuple(sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise DataError(f"{root} has no class sub-folders: expected {root}/<class_name>/<image files>")
    if len(classes) < 2:
        raise DataError(f"{root} has a single class ({classes[0]!r}): classification needs at least 2 class folders")
    return classes


def shared_classes(root: Path, split: str) -> tuple[str, ...]:
    """One class-index map for every split: the ``train`` folder's classes; another split must have the same
    set, or its labels would mean other classes."""
    if not (root / split).is_dir():
        raise DataError(f"image folder not found: {root / split} (expected class sub-folders of images)")
    train = class_folders(root / "train") if (root / "train").is_dir() else class_folders(root / split)
    own = class_folders(root / split)
    if set(own) != set(train):
        extra, missing = sorted(set(own) - set(train)), sorted(set(train) - set(own))
        raise DataError(f"{root / split} and {root / 'train'} have different classes (only in {split}: {extra[:5]}, "
                        f"missing from {split}: {missing[:5]}): give both splits the same class folders")
    return train


class ImageFolderDataset(Dataset):
    """Class sub-folders of images. Corrupt or truncated files are skipped (counted) or raise, per ``skip_corrupt``."""

    def __init__(self, root: str | os.PathLike, transform=None, skip_corrupt: bool = True,
                 classes: tuple[str, ...] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder not found: {root} (expected class sub-folders of images)")
        self.classes = classes or class_folders(root)
        self.samples = [(p, idx) for idx, c in enumerate(self.classes) if (root / c).is_dir()
                        for p in sorted((root / c).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        counts = np.bincount([idx for _, idx in self.samples], minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts) if n == 0]
        if empty:
            raise DataError(f"class folder(s) {empty[:5]} in {root} hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                            "add images or remove the folder")
        self.num_classes = len(self.classes)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Image.Image:
        return load_image(self.samples[i][0])

    def __getitem__(self, i: int):
        """``(image, label)``, or ``None`` for an unreadable image with ``skip_corrupt`` (recorded in ``skipped``;
        :func:`collate_present` drops it from the batch, so no other image is counted twice)."""
        try:
            img = self.load(i)
        except DataError:
            if not self.skip_corrupt:
                raise
            path = str(self.samples[i][0])
            if path not in self.skipped:
                self.skipped.append(path)
            return None
        return (self.transform(img) if self.transform else img), self.samples[i][1]


# ----------------------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------------------
class ToMode:
    """Convert any PIL image (L, LA, P, RGB, RGBA, I;16, CMYK ...) to ``mode`` ("L" or "RGB")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.mode == self.mode:
            return img
        if img.mode in ("RGBA", "LA", "P", "PA"):  # composite transparency on white
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, rgba)
        elif img.mode.startswith("I"):  # 16/32-bit grayscale: scale to 8 bit
            arr = np.asarray(img, dtype=np.float64)
            span = max(arr.max() - arr.min(), 1e-9)
            img = Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8))
        return img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


@dataclass
class AugmentConfig:
    """Training augmentation (timm's): all optional, so small grayscale data can train without them."""

    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (RandAugment)
    re_prob: float = 0.0  # random erasing
    color_jitter: float | None = None
    interpolation: str = "bicubic"
    crop_pct: float = 1.0


def build_transform(img_size: int, in_chans: int, train: bool, aug: AugmentConfig,
                    mean: tuple[float, ...], std: tuple[float, ...]):
    """timm's transform pipeline, preceded by the channel conversion for ``in_chans``."""
    from timm.data import create_transform
    from torchvision import transforms as T

    mean, std = tuple(mean)[:in_chans], tuple(std)[:in_chans]
    if train:
        tf = create_transform(img_size, is_training=True, scale=tuple(aug.scale), hflip=aug.hflip, vflip=0.0,
                              auto_augment=aug.auto_augment, re_prob=aug.re_prob, color_jitter=aug.color_jitter,
                              interpolation=aug.interpolation, mean=mean, std=std)
        # RandAugment's colour ops need RGB; a grayscale model gets its single channel at the end
        mode = "RGB" if (aug.auto_augment or aug.color_jitter) else ("L" if in_chans == 1 else "RGB")
    else:
        tf = create_transform(img_size, is_training=False, interpolation=aug.interpolation, crop_pct=aug.crop_pct,
                              mean=mean, std=std)
        mode = "L" if in_chans == 1 else "RGB"
    steps = [ToMode(mode), tf]
    if mode == "RGB" and in_chans == 1:
        steps = [ToMode("RGB"), tf, T.Lambda(lambda t: t.mean(0, keepdim=True))]
    return T.Compose(steps)


def eval_view(image: Image.Image, img_size: int, aug: AugmentConfig) -> Image.Image:
    """``image`` as the model sees it at evaluation: the eval transform's resize and centre crop, before tensor
    conversion (so token maps drawn over it line up with the tokens, also for non-square images)."""
    from timm.data import create_transform

    tf = create_transform(img_size, is_training=False, interpolation=aug.interpolation, crop_pct=aug.crop_pct)
    out = image.convert("RGB")
    for step in tf.transforms:
        if type(step).__name__ in ("ToTensor", "MaybeToTensor", "Normalize", "PILToTensor", "MaybePILToTensor"):
            break
        out = step(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# datasets by name
# ----------------------------------------------------------------------------------------------------------
class DatasetWrapper(Dataset):
    """Base of datasets that wrap another (``ds``): attributes they do not define (``num_classes``, ``classes``,
    ``skipped``) are the wrapped dataset's."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __getattr__(self, name: str):
        if name == "ds":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __len__(self) -> int:
        return len(self.ds)


def innermost(ds: Dataset) -> Dataset:
    while isinstance(ds, DatasetWrapper):
        ds = ds.ds
    return ds


class SeedPerSample(DatasetWrapper):
    """Random augmentation as a pure function of ``(seed, epoch, index)``.

    With data worker processes, which worker draws which sample, and the workers' RNG streams, change with the
    worker count and restart when a run resumes mid-epoch; seeding every sample from its own index makes the
    augmented images identical whatever the workers and wherever the run resumed. The caller's RNG states are
    left as they were. Call :meth:`set_epoch` before each epoch's iterator is created.
    """

    def __init__(self, ds: Dataset, seed: int) -> None:
        super().__init__(ds)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int):
        s = ((self.seed * 1_000_003 + self.epoch) * 100_003_001 + int(i)) % 2**63
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s % 2**32)
            try:
                return self.ds[i]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


class WithTokenLabels(DatasetWrapper):
    """A dataset whose targets become ``(label, token_labels[i])``: dense per-token targets (token labelling)."""

    def __init__(self, ds: Dataset, token_labels: torch.Tensor) -> None:
        super().__init__(ds)
        self.token_labels = token_labels

    def __getitem__(self, i: int):
        item = self.ds[i]
        if item is None:  # a skipped image
            return None
        image, label = item
        return image, (label, self.token_labels[i])


def load_token_labels(path: str | os.PathLike, num_images: int, num_classes: int) -> torch.Tensor:
    """Read ``[num_images, N]`` class indices or ``[num_images, N, C]`` soft labels from ``.npy`` or ``.pt``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.token_labels file not found: {path}")
    try:
        raw = np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"cannot read token labels {path} ({err}): save a [images, tokens(, classes)] array with "
                        "numpy.save (.npy) or torch.save (.pt)") from err
    labels = torch.as_tensor(raw)
    if labels.ndim not in (2, 3) or labels.shape[0] != num_images:
        raise DataError(f"token labels {path} have shape {list(labels.shape)}; expected [{num_images} training "
                        "images, tokens] (class indices) or [images, tokens, classes] (soft labels), one row per "
                        "training image in dataset order (after data.train_limit)")
    if labels.ndim == 3 and labels.shape[2] != num_classes:
        raise DataError(f"token labels {path} have {labels.shape[2]} classes, the dataset {num_classes}")
    return labels.long() if labels.ndim == 2 else labels.float()


def build_dataset(kind: str, path: str | None, split: str, transform, limit: int | None = None,
                  skip_corrupt: bool = True) -> Dataset:
    """``kind``: ``fashion_mnist`` (Debian package or ``path``), ``idx`` (idx files in ``path``), ``folder``
    (``path/train``, ``path/val`` class sub-folders)."""
    if kind == "fashion_mnist":
        ds = IdxDataset(path or FASHION_MNIST_DIR, split, transform, limit, classes=FASHION_MNIST_CLASSES)
    elif kind == "idx":
        if not path:
            raise DataError("data.kind 'idx' needs data.path: a folder with train-/t10k- idx files")
        ds = IdxDataset(path, split, transform, limit)
    elif kind == "folder":
        if not path:
            raise DataError("data.kind 'folder' needs data.path: a folder with train/ and val/ class sub-folders")
        ds = ImageFolderDataset(Path(path) / split, transform, skip_corrupt, shared_classes(Path(path), split))
        if limit is not None and limit < len(ds):
            order = np.random.default_rng(0).permutation(len(ds))[:limit]
            ds.samples = [ds.samples[i] for i in sorted(order)]
    else:
        raise DataError(f"data.kind must be 'fashion_mnist', 'idx' or 'folder', got {kind!r}")
    return ds


class ResumableSampler(Sampler[int]):
    """Epoch-seeded shuffling (optionally one shard of ``num_replicas``) that can start mid-epoch.

    The order depends only on ``(seed, epoch)``, so a resumed run sees exactly the batches it would have seen;
    ``start`` skips the samples already consumed in this epoch without loading them.
    """

    def __init__(self, length: int, shuffle: bool, seed: int, rank: int = 0, num_replicas: int = 1,
                 drop_last: bool = False, pad: bool = True) -> None:
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.num_replicas, self.drop_last, self.pad = rank, num_replicas, drop_last, pad
        self.epoch, self.start = 0, 0
        if not pad:  # evaluation: each sample exactly once over all ranks (shards may differ by one)
            self.per_replica = len(range(rank, length, num_replicas))
        else:
            self.per_replica = length // num_replicas if drop_last else -(-length // num_replicas)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(self.length, generator=g).tolist()
        else:
            idx = list(range(self.length))
        if not self.pad:
            return idx[self.rank::self.num_replicas]
        total = self.per_replica * self.num_replicas
        idx = idx[:total] if self.drop_last else (idx + idx[: total - len(idx)])
        return idx[self.rank:total:self.num_replicas]

    def __iter__(self):
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return self.per_replica - self.start


def collate_present(batch: list):
    """Default collation of the images that could be read (skipped ones are ``None``)."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise DataError(f"all {len(batch)} images of a batch are unreadable: check the dataset (data.skip_corrupt "
                        "skips single files, not whole folders of broken ones)")
    return default_collate(kept)


def build_loader(dataset: Dataset, batch_size: int, sampler: Sampler, workers: int, drop_last: bool) -> DataLoader:
    """A loader with its own generator: starting an epoch's iterator then draws its worker seed from it, not from
    the global RNG, so a resumed run's random stream (augmentation, Gumbel noise) stays aligned. With worker
    processes, the dataset's list of skipped files is shared with them, so the main process sees every skip."""
    inner = innermost(dataset)
    if workers > 0 and isinstance(getattr(inner, "skipped", None), list):
        inner.skipped = _manager().list(inner.skipped)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(), collate_fn=collate_present,
                      generator=torch.Generator().manual_seed(0))


_MANAGER = None


def _manager():
    """One multiprocessing manager per process, started on first use (only runs with data workers need it)."""
    global _MANAGER
    if _MANAGER is None:
        import multiprocessing

        _MANAGER = multiprocessing.Manager()
    return _MANAGER


def take_batches(loader, n: int):
    """The first batches of ``loader`` until at least ``n`` images were yielded (calibration, timing pools)."""
    got = 0
    for x, y in loader:
        yield x, y
        got += len(x)
        if got >= n:
            return
