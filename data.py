"""Datasets and batches: CIFAR-10, CIFAR-100, SVHN, MNIST, the binary CIFAR-10 sets and scikit-learn's digits.

Images are kept as uint8 (N, C, H, W) tensors and turned into float32 in [0, 1] batch by batch
(x = images / scale). Augmentation (zero-padded random crop, horizontal flip) runs on whole batches
with torch ops: the same distribution as torchvision's RandomCrop(H, padding=p) followed by
RandomHorizontalFlip(0.5), without PIL or worker processes. --augment picks another pipeline
(AUGMENTATIONS): ZeroGrad's reflect-padded crops, its CIFAR-100 rotations, or none.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import types
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What training needs to know about a dataset before reading it."""
    n_classes: int
    shape: tuple[int, int, int]  # (C, H, W) of one image
    crop_padding: int            # random-crop padding in pixels (0: no crop)
    hflip: bool                  # random horizontal flips
    n_train: int                 # size of the real training split


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, (3, 32, 32), 4, True, 50000),
    "cifar100": DatasetInfo(100, (3, 32, 32), 4, True, 50000),  # the 100 fine labels; augmented as CIFAR-10
    "svhn": DatasetInfo(10, (3, 32, 32), 4, False, 73257),
    "mnist": DatasetInfo(10, (1, 28, 28), 0, False, 60000),
    "cifar10_binary": DatasetInfo(2, (3, 32, 32), 4, True, 10000),
    "cifar10_binary_gs": DatasetInfo(2, (1, 32, 32), 4, True, 10000),
    "digits": DatasetInfo(10, (1, 8, 8), 0, False, 1400),
}
# --augment: the training pipeline. dataset: the dataset's own (DATASETS: the crop padding and flips
# of this paper's code); reflect: the same crop out of a reflect-padded image (ZeroGrad's CIFAR-10);
# rotate: crop and flip, then a rotation by U[-15, 15] degrees (ZeroGrad's CIFAR-100); none.
AUGMENTATIONS = ("dataset", "reflect", "rotate", "none")
ROTATION_DEGREES = 15.0
BINARY_CLASSES = (4, 8)  # deer -> 0, ship -> 1
N_DIGITS_TRAIN = 1400    # the first 1400 of scikit-learn's 1797 digits; the last 397 are the test split


class DataMissingError(Exception):
    """The dataset's files are not where --data_dir points (one-line message with the fix)."""


class DataUnreadableError(DataMissingError):
    """A dataset file exists but cannot be read (damaged, truncated, another format); the message names it."""


@dataclass(frozen=True)
class Split:
    """One split: uint8 images (N, C, H, W) and int64 labels (N,) on the CPU; pixel = images / scale."""
    images: torch.Tensor
    labels: torch.Tensor
    scale: float

    def __len__(self) -> int:
        return len(self.labels)


@functools.cache
def _readers() -> types.SimpleNamespace:
    """torchvision's dataset module and its readers, subclassed: torchvision's classes verify md5 sums
    of the files they read, which is for downloads; the subclasses only ask that the files exist, so
    tiny files in the same format load too. Imported at first use: importing torchvision takes about
    2 s, which every tool and run on the digits would otherwise pay."""
    from torchvision import datasets

    def cifar_files_exist(self) -> bool:
        files = self.train_list if self.train else self.test_list
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name, _ in files)

    def no_meta(self) -> None:
        self.classes = []  # class names (batches.meta, md5-checked) are not needed

    class CIFAR10(datasets.CIFAR10):
        _check_integrity = cifar_files_exist
        _load_meta = no_meta

    class CIFAR100(datasets.CIFAR100):
        _check_integrity = cifar_files_exist
        _load_meta = no_meta

    class SVHN(datasets.SVHN):
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    class MNIST(datasets.MNIST):
        # torchvision names the folders after the class; keep MNIST's own layout for the subclass.
        @property
        def raw_folder(self) -> str:
            return os.path.join(self.root, "MNIST", "raw")

        @property
        def processed_folder(self) -> str:
            return os.path.join(self.root, "MNIST", "processed")

        def _check_exists(self) -> bool:  # torchvision checks existence only, but of both splits
            return all(os.path.isfile(path) for path in _mnist_files(self.root, self.train))

    return types.SimpleNamespace(datasets=datasets, cifar10=CIFAR10, cifar100=CIFAR100, svhn=SVHN, mnist=MNIST)


def _cifar_reader(name: str) -> type:
    """torchvision's reader of a CIFAR dataset (the binary sets read CIFAR-10's files)."""
    return _readers().cifar100 if name == "cifar100" else _readers().cifar10


def _mnist_files(root: str, train: bool) -> list[str]:
    prefix = "train" if train else "t10k"
    return [os.path.join(root, "MNIST", "raw", f"{prefix}-{kind}-ubyte") for kind in ("images-idx3", "labels-idx1")]


def _source(name: str, data_dir: str, train: bool) -> tuple[str, str]:
    """(the dataset's name in messages, the path it is expected at)."""
    if name.startswith("cifar"):
        label = "CIFAR-100" if name == "cifar100" else "CIFAR-10"
        return label, os.path.join(data_dir, _cifar_reader(name).base_folder)
    if name == "svhn":
        return "SVHN", os.path.join(data_dir, f"{'train' if train else 'test'}_32x32.mat")
    return "MNIST", " and ".join(_mnist_files(data_dir, train))


def _download(name: str, data_dir: str, train: bool) -> None:
    """torchvision's own download, md5-verified (a no-op when verified files are already there)."""
    datasets = _readers().datasets
    if name == "cifar100":
        datasets.CIFAR100(data_dir, train=train, download=True)
    elif name.startswith("cifar10"):
        datasets.CIFAR10(data_dir, train=train, download=True)
    elif name == "svhn":
        datasets.SVHN(data_dir, split="train" if train else "test", download=True)
    else:
        datasets.MNIST(data_dir, train=train, download=True)


def _read(name: str, data_dir: str, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) through torchvision's readers."""
    if name.startswith("cifar"):
        ds = _cifar_reader(name)(data_dir, train=train)
        images, labels = ds.data.transpose(0, 3, 1, 2), ds.targets  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    elif name == "svhn":
        ds = _readers().svhn(data_dir, split="train" if train else "test")
        images, labels = ds.data, ds.labels  # already (N, 3, 32, 32), label 10 already mapped to 0
    else:
        ds = _readers().mnist(data_dir, train=train)
        images, labels = ds.data.numpy()[:, None], ds.targets.numpy()
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64).reshape(-1)


def _first_unreadable(name: str, data_dir: str, train: bool) -> str | None:
    """The first CIFAR batch or MNIST IDX file that its reader rejects (None if each reads alone);
    SVHN's one .mat file."""
    if name == "mnist":
        images, labels = _mnist_files(data_dir, train)
        idx = _readers().datasets.mnist
        for path, reader in ((images, idx.read_image_file), (labels, idx.read_label_file)):
            try:
                reader(path)
            except Exception:  # noqa: BLE001 - any failure means this file is the damaged one
                return path
        return None
    if not name.startswith("cifar"):
        return _source(name, data_dir, train)[1]
    reader = _cifar_reader(name)
    files = reader.train_list if train else reader.test_list
    for file_name, _ in files:
        path = os.path.join(data_dir, reader.base_folder, file_name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        except Exception:  # noqa: BLE001 - any failure means this file is the damaged one
            return path
    return None


def _binary(images: np.ndarray, labels: np.ndarray, grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """Deer (4) -> 0 and ship (8) -> 1, other classes dropped, order kept; grey: floored channel mean."""
    keep = np.isin(labels, BINARY_CLASSES)
    images, labels = images[keep], (labels[keep] == BINARY_CLASSES[1]).astype(np.int64)
    if grey:
        images = images.mean(axis=1, keepdims=True).astype(np.uint8)
    return images, labels


def _digits_file() -> str | None:
    """The digits file scikit-learn ships (digits.csv.gz: one row a digit, 64 pixel values then the
    label), found without importing scikit-learn; None where it is not at its place."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    return path if os.path.isfile(path) else None


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: (images (1797, 8, 8), labels (1797,)), the arrays of load_digits(),
    read once a process and read-only (both splits come from them).

    Read from _digits_file() as load_digits() reads it: importing sklearn.datasets takes about 2 s (it
    imports SciPy), which every run on the digits would otherwise pay. Without that file, load_digits()."""
    path = _digits_file()
    if path is not None:
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits
        bunch = load_digits()
        images, labels = bunch.images, bunch.target
    for array in (images, labels):
        array.flags.writeable = False
    return images, labels


def _digits(train: bool) -> Split:
    pixels, target = _digits_arrays()
    images = torch.from_numpy(pixels.astype(np.uint8))[:, None]  # integer values 0..16
    labels = torch.from_numpy(target.astype(np.int64))
    part = slice(0, N_DIGITS_TRAIN) if train else slice(N_DIGITS_TRAIN, None)
    return Split(images[part].contiguous(), labels[part].contiguous(), 16.0)


def _one_line(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def load_split(name: str, data_dir: str, train: bool, download: bool = False) -> Split:
    """The training or test split of a dataset (see DATASETS), read from data_dir (unused by digits).

    download: first fetch the files with torchvision (md5-verified). Raises ValueError for an unknown
    name and DataMissingError (one line, with the fix) when the files are absent or cannot be fetched.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _digits(train)
    label, expected = _source(name, os.path.abspath(data_dir), train)
    if download:
        try:
            _download(name, data_dir, train)
        except (OSError, RuntimeError) as exc:
            raise DataMissingError(f"{label} could not be downloaded to {os.path.abspath(data_dir)} "
                                   f"({_one_line(exc)}); put the files at {expected} and point --data_dir "
                                   "(or DATA_DIR) at them") from None
    try:
        images, labels = _read(name, data_dir, train)
    except Exception as exc:  # noqa: BLE001 - a damaged file can fail in any of the readers' ways
        if isinstance(exc, RuntimeError) and "not found" in str(exc).lower():  # torchvision's "not found or corrupted"
            raise DataMissingError(f"{label} not found under {os.path.abspath(data_dir)} (expected {expected}); "
                                   "put the dataset there, point --data_dir (or DATA_DIR) at it, or pass --download"
                                   ) from None
        culprit = _first_unreadable(name, os.path.abspath(data_dir), train) or expected
        raise DataUnreadableError(f"cannot read the {label} file {culprit} ({_one_line(exc)[:160]}); it is damaged "
                                  "or not in the expected format: replace it (--download fetches a verified copy)"
                                  ) from None
    if name.startswith("cifar10_binary"):
        images, labels = _binary(images, labels, grey=name.endswith("_gs"))
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), 255.0)


def check_model_input(model_name: str, shape: tuple[int, int, int]) -> None:
    """Raises ValueError when the architecture cannot take images of this (C, H, W) shape.

    The PreAct ResNet-18s (avg_pool2d(4) before a 512-input linear layer) need 3 channels and a square
    side in 25..56 (a 4..7 final feature map); the wide networks (two stride-2 stages, avg_pool2d(8)
    before their linear layer) 3 channels and a square side in 29..60 (an 8..15 final map); cnn takes
    any shape.
    """
    sides = {"resnet18": (25, 56), "resnet18_nfgsm": (25, 56), "resnet18_rice": (25, 56), "wrn28_10": (29, 60),
             "wrn28_10_nfgsm": (29, 60)}
    if model_name not in sides:
        return
    channels, height, width = shape
    low, high = sides[model_name]
    if channels != 3:
        raise ValueError(f"{model_name} needs 3-channel images; these have {channels} channel(s): use --model cnn")
    if height != width or not low <= height <= high:
        raise ValueError(f"{model_name} takes square images of side {low}..{high}, not {height}x{width}: "
                         "use --model cnn")


class Batches:
    """Batches (x, y) of a Split: x float32 (B, C, H, W) in [0, 1] and y int64 (B,), on `device`.

    shuffle: a new permutation per pass (per __iter__), from `generator`; drop_last: only whole batches;
    n: only the first n examples (None or -1: all); crop_padding / hflip / rotate: augmentation per
    example (rotate: degrees of a rotation U[-rotate, rotate] after the crop and flip; 0: none);
    pad_mode: how the crop pads ("constant": zeros, "reflect").
    store_on_device: the uint8 dataset is moved once to `device` (a GPU-resident dataset) and batches are
    drawn and augmented there. Otherwise it stays on the CPU; each uint8 batch is gathered there, pinned
    (CUDA) and copied without blocking, then converted and augmented on `device`.
    All random numbers come from `.generator`, which lives where the data live (default: seeded with
    torch.initial_seed()); its state is what a resumed run restores.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, drop_last: bool, crop_padding: int = 0,
                 hflip: bool = False, n: int | None = None, device: str | torch.device = "cpu",
                 store_on_device: bool = False, generator: torch.Generator | None = None,
                 pad_mode: str = "constant", rotate: float = 0.0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        self.device = torch.device(device)
        home = self.device if store_on_device else torch.device("cpu")
        self.n = len(split) if n is None or n < 0 else min(n, len(split))
        self.images, self.labels = split.images[: self.n].to(home), split.labels[: self.n].to(home)
        self.transfer = home.type != self.device.type  # copy each batch from the CPU to the device
        self.scale, self.batch_size = split.scale, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.hflip = crop_padding, hflip
        self.pad_mode, self.rotate = pad_mode, rotate
        if generator is None:
            generator = torch.Generator(device=home).manual_seed(torch.initial_seed())
        if generator.device.type != home.type:
            raise ValueError(f"the generator is on {generator.device} but the data are stored on {home}: "
                             f"create it with torch.Generator(device='{home}')")
        self.generator = generator

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        home, bs, gen = self.images.device, self.batch_size, self.generator
        order = (torch.randperm(self.n, generator=gen, device=home) if self.shuffle
                 else torch.arange(self.n, device=home))
        for start in range(0, len(self) * bs, bs):
            idx = order[start:start + bs]
            x, y = self.images[idx], self.labels[idx]
            offsets = flips = angles = None  # drawn where the data live, always in this order
            if self.crop_padding:
                offsets = torch.randint(0, 2 * self.crop_padding + 1, (2, len(y)), generator=gen, device=home)
            if self.hflip:
                flips = torch.rand(len(y), generator=gen, device=home) < 0.5
            if self.rotate:
                angles = (torch.rand(len(y), generator=gen, device=home) * 2 - 1) * self.rotate
            if self.transfer:
                x, y = self._to_device(x), self._to_device(y)
                offsets = None if offsets is None else self._to_device(offsets)
                flips = None if flips is None else self._to_device(flips)
                angles = None if angles is None else self._to_device(angles)
            x = x.float() / self.scale
            if offsets is not None:
                x = batch_crop(x, self.crop_padding, offsets, self.pad_mode)
            if flips is not None:
                x = batch_flip_lr(x, flips)
            if angles is not None:
                x = batch_rotate(x, angles)
            yield x, y


def batch_crop(x: torch.Tensor, padding: int, offsets: torch.Tensor, mode: str = "constant") -> torch.Tensor:
    """Crops each image of x (B, C, H, W) out of its padded copy (padding p on every side; mode
    "constant": zeros, "reflect": mirrored without repeating the edge, as numpy's pad mode 'reflect').

    offsets: int64 (2, B) in [0, 2p], rows then columns; offset p is the original image.
    """
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding), mode=mode)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def batch_flip_lr(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flips left-right the images of x (B, C, H, W) where the bool mask flips (B,) is True."""
    return torch.where(flips[:, None, None, None], x.flip(3), x)


def batch_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates each image of x (B, C, H, W) about its centre by angles (B,) degrees, as torchvision's
    RandomRotation does by default: nearest-neighbour sampling at the pixel centres, the same size,
    zeros where the rotated image leaves the frame. (A pixel centre that falls exactly between two
    source pixels may round to the other one than PIL's.)"""
    theta = angles.to(x.dtype) * (torch.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    h, w = x.shape[-2:]
    # the inverse map from output to input coordinates in affine_grid's [-1, 1] units, with the
    # aspect ratio taken into account so that non-square images rotate rigidly
    row0 = torch.stack([cos, -sin * h / w, torch.zeros_like(cos)], dim=1)
    row1 = torch.stack([sin * w / h, cos, torch.zeros_like(cos)], dim=1)
    grid = torch.nn.functional.affine_grid(torch.stack([row0, row1], dim=1), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augmentation(name: str, info: DatasetInfo) -> dict:
    """Batches' augmentation arguments for --augment `name` (AUGMENTATIONS) on a dataset."""
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown --augment '{name}': choose one of {', '.join(AUGMENTATIONS)}")
    if name == "none":
        return {"crop_padding": 0, "hflip": False}
    plain = {"crop_padding": info.crop_padding, "hflip": info.hflip}
    if name == "reflect":
        return {**plain, "pad_mode": "reflect"}
    if name == "rotate":
        return {**plain, "rotate": ROTATION_DEGREES}
    return plain


# ------------------------------------------------------------------------------ one run's loaders
@dataclass
class RunData:
    """The loaders of one run (images in [0, 1] on the device)."""
    info: DatasetInfo
    train: Batches        # shuffled, augmented, drop_last
    train_subset: Batches  # first n_eval_every_k_iter, whole batch_size batches (early stopping)
    test_subset: Batches  # first n_eval_every_k_iter test points (periodic evaluation)
    test_final: Batches   # first n_final_eval test points (final evaluation)
    n_final: int               # how many points that is


def load_run_data(cfg, device: torch.device) -> RunData:
    """The loaders of train.py's run with settings cfg (a config.Config): loads both splits
    (DataMissingError if absent) and checks the sizes the flags ask for."""
    info = DATASETS[cfg.dataset]
    check_model_input(cfg.model, info.shape)
    augment = augmentation(cfg.augment, info)
    train_split = load_split(cfg.dataset, cfg.data_dir, train=True, download=cfg.download)
    test_split = load_split(cfg.dataset, cfg.data_dir, train=False, download=cfg.download)
    if cfg.n_final_eval > len(test_split):
        raise ValueError(f"--n_final_eval {cfg.n_final_eval} exceeds the {len(test_split)} test points of "
                         f"{cfg.dataset}; use -1 for all")
    if len(train_split) < cfg.batch_size:
        raise ValueError(f"--batch_size {cfg.batch_size} exceeds the {len(train_split)} training points")
    on_device = cfg.data_on_device if cfg.data_on_device is not None else device.type == "cuda"
    gen_device = device if on_device else torch.device("cpu")
    generator = torch.Generator(device=gen_device).manual_seed(cfg.seed)

    def batches(split, batch_size, **kw):
        return Batches(split, batch_size, device=device, store_on_device=on_device, **kw)
    n_final = None if cfg.n_final_eval < 0 else cfg.n_final_eval
    return RunData(
        info=info,
        train=batches(train_split, cfg.batch_size, shuffle=True, drop_last=True, generator=generator, **augment),
        train_subset=batches(train_split, cfg.batch_size, shuffle=False, drop_last=True, n=cfg.n_eval_every_k_iter),
        test_subset=batches(test_split, cfg.batch_size_eval, shuffle=False, drop_last=False,
                            n=cfg.n_eval_every_k_iter),
        test_final=batches(test_split, cfg.batch_size_eval, shuffle=False, drop_last=False, n=n_final),
        n_final=len(test_split) if n_final is None else n_final)
