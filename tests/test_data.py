"""data.py on tiny files in the real formats, digits, batching and augmentation."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import data
from tests.fixtures import write_cifar10, write_mnist, write_svhn

TRAIN_LABELS = [[4, 0, 8], [1, 8, 4], [2, 3, 5], [6, 7, 9], [4, 4, 8]]  # 15 images: 5 deer, 3 ships
TEST_LABELS = [8, 1, 4, 0]
ALL_TRAIN_LABELS = [label for batch in TRAIN_LABELS for label in batch]


@pytest.fixture
def cifar_dir(tmp_path):
    write_cifar10(tmp_path, TRAIN_LABELS, TEST_LABELS)
    return str(tmp_path)


def test_cifar10_pickles_load_with_shapes_and_labels(cifar_dir):
    train = data.load_split("cifar10", cifar_dir, train=True)
    test = data.load_split("cifar10", cifar_dir, train=False)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == ALL_TRAIN_LABELS and test.labels.tolist() == TEST_LABELS
    assert train.scale == 255.0 and len(test) == 4


def test_cifar10_channels_come_from_the_pickle_layout(tmp_path):
    write_cifar10(tmp_path, [[1]] * 5, [2])
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        entry = pickle.load(f)
    row = entry["data"][0]  # 1024 red, 1024 green, 1024 blue values, row-major
    test = data.load_split("cifar10", str(tmp_path), train=False)
    assert np.array_equal(test.images[0, 1].numpy().ravel(), row[1024:2048])


def test_binary_sets_keep_deer_and_ship_in_order(cifar_dir):
    train = data.load_split("cifar10_binary", cifar_dir, train=True)
    all_labels = ALL_TRAIN_LABELS
    expected = [0 if label == 4 else 1 for label in all_labels if label in (4, 8)]
    assert train.labels.tolist() == expected
    full = data.load_split("cifar10", cifar_dir, train=True)
    keep = [i for i, label in enumerate(all_labels) if label in (4, 8)]
    assert torch.equal(train.images, full.images[keep])
    grey = data.load_split("cifar10_binary_gs", cifar_dir, train=True)
    assert grey.images.shape == (len(keep), 1, 32, 32) and grey.images.dtype == torch.uint8
    floor_mean = full.images[keep].double().mean(1, keepdim=True).floor().to(torch.uint8)
    assert torch.equal(grey.images, floor_mean)
    assert data.load_split("cifar10_binary", cifar_dir, train=False).labels.tolist() == [1, 0]


def test_svhn_mat_files_map_label_10_to_0(tmp_path):
    write_svhn(tmp_path, [10, 1, 5, 10], [3, 10])
    train = data.load_split("svhn", str(tmp_path), train=True)
    assert train.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == [0, 1, 5, 0]
    assert data.load_split("svhn", str(tmp_path), train=False).labels.tolist() == [3, 0]


def test_mnist_idx_files_load(tmp_path):
    write_mnist(tmp_path, 12, 5)
    train = data.load_split("mnist", str(tmp_path), train=True)
    assert train.images.shape == (12, 1, 28, 28) and train.labels.tolist() == [i % 10 for i in range(12)]
    assert len(data.load_split("mnist", str(tmp_path), train=False)) == 5


def test_digits_split_and_values():
    train, test = data.load_split("digits", "", True), data.load_split("digits", "", False)
    assert (len(train), len(test)) == (1400, 397)
    assert train.images.shape[1:] == (1, 8, 8) and train.scale == 16.0 and int(train.images.max()) == 16
    sk = load_digits()
    assert np.array_equal(train.images[0, 0].numpy(), sk.images[0])
    assert np.array_equal(test.labels.numpy(), sk.target[1400:])


@pytest.mark.parametrize("name", ["cifar10", "svhn", "mnist", "cifar10_binary_gs"])
def test_missing_data_is_a_one_line_error_naming_path_and_fix(tmp_path, name):
    with pytest.raises(data.DataMissingError) as info:
        data.load_split(name, str(tmp_path / "nowhere"), train=True)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message and "--download" in message


@pytest.mark.parametrize("name", ["uniform_noise", "imagenet", "foo"])
def test_unknown_datasets_are_rejected(name):
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_split(name, ".", train=True)


def _digits_batches(**kw):
    return data.Batches(data.load_split("digits", "", True), **kw)


def test_batch_counts_first_n_and_order():
    b = _digits_batches(batch_size=128, shuffle=False, drop_last=True)
    assert len(b) == 10
    assert len(_digits_batches(batch_size=128, shuffle=False, drop_last=False)) == 11
    sub = _digits_batches(batch_size=100, shuffle=False, drop_last=False, n=250)
    xs, ys = zip(*sub)
    assert [len(y) for y in ys] == [100, 100, 50]
    split = data.load_split("digits", "", True)
    assert torch.equal(torch.cat(xs), split.images[:250].float() / 16)  # no augmentation: exact pixels
    assert torch.equal(torch.cat(ys), split.labels[:250])


def test_shuffle_depends_on_the_generator_only():
    def first_labels(seed):
        gen = torch.Generator().manual_seed(seed)
        return next(iter(_digits_batches(batch_size=64, shuffle=True, drop_last=True, generator=gen)))[1]
    assert torch.equal(first_labels(3), first_labels(3))
    assert not torch.equal(first_labels(3), first_labels(4))


def _constant_split(n=512, value=255, side=8):
    images = torch.full((n, 1, side, side), value, dtype=torch.uint8)
    images[:, :, :, : side // 2] = 0  # left half dark: flips are visible
    return data.Split(images, torch.zeros(n, dtype=torch.long), 255.0)


def test_random_crop_pads_with_zeros_and_varies_offsets():
    split = data.Split(torch.full((512, 1, 8, 8), 255, dtype=torch.uint8), torch.zeros(512, dtype=torch.long), 255.)
    gen = torch.Generator().manual_seed(0)
    (x, _), = data.Batches(split, 512, shuffle=False, drop_last=True, crop_padding=2, generator=gen)
    assert x.min() >= 0 and x.max() <= 1
    ones = x[:, 0] == 1
    top_zero_rows = (~ones).all(dim=2).int().cumprod(dim=1).sum(1)  # zero rows from the top
    left_zero_cols = (~ones).all(dim=1).int().cumprod(dim=1).sum(1)
    assert top_zero_rows.max() <= 2 and left_zero_cols.max() <= 2
    assert ones[:, 2:6, 2:6].all()  # the centre is never padding
    assert len(set(zip(top_zero_rows.tolist(), left_zero_cols.tolist()))) > 5  # offsets vary
    assert (x.sum((1, 2, 3)) < 64).float().mean() > 0.5  # most crops include some padding


def test_horizontal_flip_hits_about_half():
    gen = torch.Generator().manual_seed(0)
    (x, _), = data.Batches(_constant_split(), 512, shuffle=False, drop_last=True, hflip=True, generator=gen)
    flipped = (x[:, 0, :, 0] == 1).all(1)  # the bright half moved to the left
    assert 0.4 < flipped.float().mean() < 0.6
    assert ((x[:, 0, :, 0] == 0).all(1) | flipped).all()


def test_check_model_input():
    data.check_model_input("resnet18", (3, 32, 32))
    data.check_model_input("cnn", (1, 8, 8))
    with pytest.raises(ValueError, match="3-channel"):
        data.check_model_input("resnet18", (1, 28, 28))
    with pytest.raises(ValueError, match="side"):
        data.check_model_input("resnet18", (3, 8, 8))
