"""Datasets and batches: CIFAR-10, SVHN, MNIST, the binary CIFAR-10 sets and scikit-learn's digits.

Images are kept as uint8 (N, C, H, W) tensors and turned into float32 in [0, 1] batch by batch
(x = images / scale). Augmentation (zero-padded random crop, horizontal flip) runs on whole batches
with torch ops, on the device where the data live: the same distribution as torchvision's
RandomCrop(padding=p) + RandomHorizontalFlip(0.5), without PIL or worker processes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import datasets


@dataclass(frozen=True)
class DatasetInfo:
    n_classes: int
    shape: tuple[int, int, int]  # (C, H, W) of one image
    crop_padding: int            # random-crop padding in pixels (0: no crop)
    hflip: bool                  # random horizontal flips
    n_train: int                 # size of the real training split


DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(10, (3, 32, 32), 4, True, 50000),
    "svhn": DatasetInfo(10, (3, 32, 32), 4, False, 73257),
    "mnist": DatasetInfo(10, (1, 28, 28), 0, False, 60000),
    "cifar10_binary": DatasetInfo(2, (3, 32, 32), 4, True, 10000),
    "cifar10_binary_gs": DatasetInfo(2, (1, 32, 32), 4, True, 10000),
    "digits": DatasetInfo(10, (1, 8, 8), 0, False, 1400),
}
BINARY_CLASSES = (4, 8)  # deer -> 0, ship -> 1
N_DIGITS_TRAIN = 1400


class DataMissingError(Exception):
    """The dataset's files are not where --data_dir points (one-line message with the fix)."""


@dataclass(frozen=True)
class Split:
    """One split: uint8 images (N, C, H, W) and int64 labels (N,); pixel = images / scale."""
    images: torch.Tensor
    labels: torch.Tensor
    scale: float

    def __len__(self) -> int:
        return len(self.labels)


# torchvision's classes verify md5 sums of the files they read; that is for downloads. These
# subclasses only ask that the files exist, so tiny files in the same format load too.
class _CIFAR10(datasets.CIFAR10):
    def _check_integrity(self) -> bool:
        files = self.train_list if self.train else self.test_list
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name)) for name, _ in files)

    def _load_meta(self) -> None:
        self.classes = []  # class names are not needed


class _SVHN(datasets.SVHN):
    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


class _MNIST(datasets.MNIST):
    @property
    def raw_folder(self) -> str:  # torchvision derives it from the class name
        return os.path.join(self.root, "MNIST", "raw")

    def _check_exists(self) -> bool:
        prefix = "train" if self.train else "t10k"
        return all(os.path.isfile(os.path.join(self.raw_folder, f"{prefix}-{kind}-ubyte"))
                   for kind in ("images-idx3", "labels-idx1"))


def _expected_path(name: str, data_dir: str) -> str:
    if name.startswith("cifar10"):
        return os.path.join(data_dir, "cifar-10-batches-py")
    if name == "svhn":
        return os.path.join(data_dir, "{train,test}_32x32.mat")
    return os.path.join(data_dir, "MNIST", "raw")


def _read_torchvision(name: str, data_dir: str, train: bool, download: bool):
    """(images uint8 NCHW numpy, labels int64 numpy) through torchvision's readers."""
    if name.startswith("cifar10"):
        if download:
            datasets.CIFAR10(data_dir, train=train, download=True)
        ds = _CIFAR10(data_dir, train=train)
        return np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)), np.asarray(ds.targets, dtype=np.int64)
    if name == "svhn":
        split = "train" if train else "test"
        if download:
            datasets.SVHN(data_dir, split=split, download=True)
        ds = _SVHN(data_dir, split=split)
        return ds.data, ds.labels.astype(np.int64)
    if download:
        datasets.MNIST(data_dir, train=train, download=True)
    ds = _MNIST(data_dir, train=train)
    return ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)


def _binary(images: np.ndarray, labels: np.ndarray, grey: bool):
    """Deer (4) -> 0 and ship (8) -> 1, other classes dropped, order kept; grey: floored channel mean."""
    keep = np.isin(labels, BINARY_CLASSES)
    images, labels = images[keep], (labels[keep] == BINARY_CLASSES[1]).astype(np.int64)
    if grey:
        images = images.mean(axis=1, keepdims=True).astype(np.uint8)
    return images, labels


def _digits(train: bool) -> Split:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8))[:, None]  # values 0..16
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    part = slice(0, N_DIGITS_TRAIN) if train else slice(N_DIGITS_TRAIN, None)
    return Split(images[part].contiguous(), labels[part].contiguous(), 16.0)


def load_split(name: str, data_dir: str, train: bool, download: bool = False) -> Split:
    """The training or test split of a dataset (see DATASETS), read from data_dir.

    Raises ValueError for an unknown name and DataMissingError when the files are absent.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _digits(train)
    try:
        images, labels = _read_torchvision(name, data_dir, train, download)
    except RuntimeError as exc:
        if "not found" not in str(exc).lower() and "corrupted" not in str(exc).lower():
            raise
        raise DataMissingError(
            f"{name} not found under {os.path.abspath(data_dir)} (expected {_expected_path(name, data_dir)}); "
            "put the files there, point --data_dir (or DATA_DIR) at them, or pass --download") from None
    if name.startswith("cifar10_binary"):
        images, labels = _binary(images, labels, grey=name.endswith("_gs"))
    return Split(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), 255.0)


def check_model_input(model_name: str, shape: tuple[int, int, int]) -> None:
    """Raises ValueError when the architecture cannot take images of this (C, H, W) shape."""
    channels, height, width = shape
    if model_name != "resnet18":
        return
    if channels != 3:
        raise ValueError(f"resnet18 needs 3-channel images; these have {channels} channel(s): use --model cnn")
    if height != width or not 25 <= height <= 56:
        raise ValueError(f"resnet18 takes square images of side 25..56, not {height}x{width}: use --model cnn")


class Batches:
    """Batches (x, y) of a Split: x float32 (B, C, H, W) in [0, 1] and y int64 (B,), on `device`.

    shuffle: a new permutation per pass, from `generator`; drop_last: only whole batches;
    n: only the first n examples (None or -1: all); crop_padding / hflip: augmentation per example.
    store_on_device keeps the uint8 dataset on `device` (the GPU-resident dataset); otherwise it stays
    on the CPU (pinned when the device is CUDA) and each batch is copied without blocking.
    The generator lives where the data live; `.generator` is its handle for saving and resuming.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, drop_last: bool, crop_padding: int = 0,
                 hflip: bool = False, n: int | None = None, device: str | torch.device = "cpu",
                 store_on_device: bool = False, generator: torch.Generator | None = None):
        self.device = torch.device(device)
        self.n = len(split) if n is None or n < 0 else min(n, len(split))
        home = self.device if store_on_device else torch.device("cpu")
        images, labels = split.images[: self.n], split.labels[: self.n]
        if home.type == "cpu" and self.device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        self.images, self.labels = images.to(home), labels.to(home)
        self.scale, self.batch_size = split.scale, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.hflip = crop_padding, hflip
        self.generator = generator or torch.Generator(device=home).manual_seed(torch.initial_seed())

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self):
        home = self.images.device
        order = (torch.randperm(self.n, generator=self.generator, device=home) if self.shuffle
                 else torch.arange(self.n, device=home))
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float() / self.scale
            if self.crop_padding:
                x = random_crop(x, self.crop_padding, self.generator)
            if self.hflip:
                x = random_hflip(x, self.generator)
            yield (x.to(self.device, non_blocking=True),
                   self.labels[idx].to(self.device, non_blocking=True))


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-example random crop of the zero-padded batch (B, C, H, W), offsets uniform in [0, 2p]."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips each image (B, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)
