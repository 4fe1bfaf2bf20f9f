"""data.py on tiny files in the real formats, digits, batching and augmentation."""
from __future__ import annotations

import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from scipy.io import loadmat
from sklearn.datasets import load_digits

import data
from tests.fixtures import write_cifar10, write_cifar100, write_mnist, write_svhn

TRAIN_LABELS = [[4, 0, 8], [1, 8, 4], [2, 3, 5], [6, 7, 9], [4, 4, 8]]  # 15 images: 5 deer, 3 ships
TEST_LABELS = [8, 1, 4, 0]
ALL_TRAIN_LABELS = [label for batch in TRAIN_LABELS for label in batch]


@pytest.fixture
def cifar_dir(tmp_path):
    write_cifar10(tmp_path, TRAIN_LABELS, TEST_LABELS)
    return str(tmp_path)


# ------------------------------------------------------------------------------------ reading files
def test_cifar10_pickles_load_with_shapes_and_labels(cifar_dir):
    train = data.load_split("cifar10", cifar_dir, train=True)
    test = data.load_split("cifar10", cifar_dir, train=False)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and test.images.shape == (4, 3, 32, 32)
    assert train.labels.tolist() == ALL_TRAIN_LABELS and test.labels.tolist() == TEST_LABELS
    assert train.scale == 255.0 and len(test) == 4


def test_cifar10_channels_come_from_the_pickle_layout(tmp_path):
    write_cifar10(tmp_path, [[1]] * 5, [2])
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "rb") as f:
        row = pickle.load(f)["data"][0]  # 1024 red, 1024 green, 1024 blue values, row-major
    test = data.load_split("cifar10", str(tmp_path), train=False)
    assert np.array_equal(test.images[0].numpy().ravel(), row)


def test_cifar100_pickles_load_fine_labels_and_pixels(tmp_path):
    train_labels, test_labels = [0, 99, 42, 7, 63], [5, 98, 0]
    write_cifar100(tmp_path, train_labels, test_labels)
    train = data.load_split("cifar100", str(tmp_path), train=True)
    test = data.load_split("cifar100", str(tmp_path), train=False)
    assert train.images.shape == (5, 3, 32, 32) and train.images.dtype == torch.uint8 and train.scale == 255.0
    assert train.labels.tolist() == train_labels and test.labels.tolist() == test_labels  # fine, not coarse
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        rows = pickle.load(f)["data"]  # 1024 red, 1024 green, 1024 blue values per row
    assert np.array_equal(test.images.numpy().reshape(3, -1), rows)
    info = data.DATASETS["cifar100"]
    assert (info.n_classes, info.crop_padding, info.hflip) == (100, 4, True)  # augmented as CIFAR-10
    os.remove(tmp_path / "cifar-100-python" / "train")
    with pytest.raises(data.DataMissingError, match="CIFAR-100 not found.*cifar-100-python"):
        data.load_split("cifar100", str(tmp_path), train=True)
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(data.DataUnreadableError, match="cifar-100-python/train"):
        data.load_split("cifar100", str(tmp_path), train=True)


def test_binary_sets_keep_deer_and_ship_in_order(cifar_dir):
    train = data.load_split("cifar10_binary", cifar_dir, train=True)
    expected = [0 if label == 4 else 1 for label in ALL_TRAIN_LABELS if label in (4, 8)]
    assert train.labels.tolist() == expected
    full = data.load_split("cifar10", cifar_dir, train=True)
    keep = [i for i, label in enumerate(ALL_TRAIN_LABELS) if label in (4, 8)]
    assert torch.equal(train.images, full.images[keep])
    grey = data.load_split("cifar10_binary_gs", cifar_dir, train=True)
    assert grey.images.shape == (len(keep), 1, 32, 32) and grey.images.dtype == torch.uint8
    floor_mean = full.images[keep].double().mean(1, keepdim=True).floor().to(torch.uint8)
    assert torch.equal(grey.images, floor_mean) and grey.labels.tolist() == expected
    assert data.load_split("cifar10_binary", cifar_dir, train=False).labels.tolist() == [1, 0]


def test_svhn_mat_files_map_label_10_to_0_and_keep_pixels(tmp_path):
    write_svhn(tmp_path, [10, 1, 5, 10], [3, 10])
    train = data.load_split("svhn", str(tmp_path), train=True)
    assert train.images.shape == (4, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 1, 5, 0] and train.labels.dtype == torch.int64
    x = loadmat(tmp_path / "train_32x32.mat")["X"]  # (H, W, C, N)
    assert np.array_equal(train.images.numpy(), x.transpose(3, 2, 0, 1))
    assert data.load_split("svhn", str(tmp_path), train=False).labels.tolist() == [3, 0]


def test_svhn_single_example_is_still_a_vector(tmp_path):
    write_svhn(tmp_path, [7], [10])
    assert data.load_split("svhn", str(tmp_path), train=False).labels.tolist() == [0]


def test_mnist_idx_files_load(tmp_path):
    write_mnist(tmp_path, 12, 5)
    train = data.load_split("mnist", str(tmp_path), train=True)
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [i % 10 for i in range(12)] and train.scale == 255.0
    with open(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", "rb") as f:
        pixels = np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(12, 28, 28)  # after the 16-byte header
    assert np.array_equal(train.images[:, 0].numpy(), pixels)
    assert len(data.load_split("mnist", str(tmp_path), train=False)) == 5


def test_digits_split_and_values():
    train, test = data.load_split("digits", "", True), data.load_split("digits", "", False)
    assert (len(train), len(test)) == (1400, 397)
    assert train.images.shape == (1400, 1, 8, 8) and train.images.dtype == torch.uint8
    assert train.scale == 16.0 and int(train.images.max()) == 16
    sk = load_digits()
    assert np.array_equal(train.images[0, 0].numpy(), sk.images[0])
    assert np.array_equal(test.images[-1, 0].numpy(), sk.images[-1])
    assert np.array_equal(test.labels.numpy(), sk.target[1400:])
    assert np.array_equal(torch.cat([train.images, test.images])[:, 0].numpy(), sk.images)  # every pixel


def test_digits_come_from_load_digits_where_its_file_is_not_found(monkeypatch):
    assert data._digits_file() is not None  # the file is read where it is found
    read = data._digits_arrays.__wrapped__()
    monkeypatch.setattr(data, "_digits_file", lambda: None)
    fallback = data._digits_arrays.__wrapped__()
    assert all(np.array_equal(a, b) for a, b in zip(read, fallback))
    assert not any(a.flags.writeable for a in read + fallback)


def test_dataset_table_matches_what_loads(cifar_dir):
    assert set(data.DATASETS) == {"cifar10", "cifar100", "svhn", "mnist", "cifar10_binary", "cifar10_binary_gs",
                                  "digits"}
    for name in ("cifar10", "cifar10_binary", "cifar10_binary_gs", "digits"):
        split = data.load_split(name, cifar_dir, train=True)
        assert tuple(split.images.shape[1:]) == data.DATASETS[name].shape
        assert int(split.labels.max()) < data.DATASETS[name].n_classes


# ------------------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "mnist", "cifar10_binary_gs"])
def test_missing_data_is_a_one_line_error_naming_path_and_fix(tmp_path, name):
    with pytest.raises(data.DataMissingError) as info:
        data.load_split(name, str(tmp_path / "nowhere"), train=True)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert "--download" in message and "--data_dir" in message


def test_partial_data_is_missing_data_and_names_the_file(tmp_path, monkeypatch):
    write_cifar10(tmp_path, TRAIN_LABELS, TEST_LABELS)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(data.DataMissingError, match="cifar-10-batches-py"):
        data.load_split("cifar10", str(tmp_path), train=True)
    assert len(data.load_split("cifar10", str(tmp_path), train=False)) == 4  # the test split is whole
    write_svhn(tmp_path, [1], [2])
    os.remove(tmp_path / "test_32x32.mat")
    with pytest.raises(data.DataMissingError, match="test_32x32.mat"):
        data.load_split("svhn", str(tmp_path), train=False)
    monkeypatch.chdir(tmp_path)  # a relative data_dir is reported as an absolute path
    with pytest.raises(data.DataMissingError) as info:
        data.load_split("mnist", "rel", train=False)
    assert f"under {tmp_path / 'rel'} (expected {tmp_path / 'rel' / 'MNIST' / 'raw'}" in str(info.value)


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route\nto host")
    monkeypatch.setattr(data._readers().datasets, "CIFAR10", offline)
    with pytest.raises(data.DataMissingError) as info:
        data.load_split("cifar10", str(tmp_path), train=True, download=True)
    message = str(info.value)
    assert "\n" not in message and "no route to host" in message and str(tmp_path) in message


@pytest.mark.parametrize("name", ["uniform_noise", "imagenet", "foo"])
def test_unknown_datasets_are_rejected(name):
    with pytest.raises(ValueError, match="unknown dataset") as info:
        data.load_split(name, ".", train=True)
    assert "\n" not in str(info.value) and all(valid in str(info.value) for valid in data.DATASETS)


def test_check_model_input():
    data.check_model_input("resnet18", (3, 32, 32))
    data.check_model_input("resnet18", (3, 25, 25))
    data.check_model_input("resnet18", (3, 56, 56))
    for side in (29, 32, 60):
        data.check_model_input("wrn28_10", (3, side, side))
    for shape in [(3, 28, 28), (3, 61, 61), (3, 32, 30)]:
        with pytest.raises(ValueError, match="wrn28_10 takes square images of side 29..60"):
            data.check_model_input("wrn28_10", shape)
    with pytest.raises(ValueError, match="wrn28_10 needs 3-channel"):
        data.check_model_input("wrn28_10", (1, 32, 32))
    for shape in [(1, 8, 8), (1, 28, 28), (3, 100, 7), (5, 32, 32)]:
        data.check_model_input("cnn", shape)
    with pytest.raises(ValueError, match="3-channel.*--model cnn"):
        data.check_model_input("resnet18", (1, 28, 28))
    for shape in [(3, 8, 8), (3, 24, 24), (3, 57, 57), (3, 32, 28)]:
        with pytest.raises(ValueError, match="side.*--model cnn"):
            data.check_model_input("resnet18", shape)


# ------------------------------------------------------------------------------------------ batches
def _digits_batches(**kw):
    return data.Batches(data.load_split("digits", "", True), **kw)


def test_batch_counts_first_n_and_order():
    assert len(_digits_batches(batch_size=128, shuffle=False, drop_last=True)) == 10
    assert len(_digits_batches(batch_size=128, shuffle=False, drop_last=False)) == 11
    assert len(list(_digits_batches(batch_size=128, shuffle=True, drop_last=True))) == 10
    assert len(_digits_batches(batch_size=100, shuffle=False, drop_last=False, n=-1)) == 14
    assert len(_digits_batches(batch_size=100, shuffle=False, drop_last=False, n=5000)) == 14
    sub = _digits_batches(batch_size=100, shuffle=False, drop_last=False, n=250)
    assert len(sub) == 3
    xs, ys = zip(*sub)
    assert [len(y) for y in ys] == [100, 100, 50] and xs[0].dtype == torch.float32 and ys[0].dtype == torch.int64
    split = data.load_split("digits", "", True)
    assert torch.equal(torch.cat(xs), split.images[:250].float() / 16)  # no augmentation: exact pixels
    assert torch.equal(torch.cat(ys), split.labels[:250])


def test_shuffle_is_a_fresh_permutation_each_pass():
    n = 300
    split = data.Split(torch.arange(n).reshape(n, 1, 1, 1).remainder(256).to(torch.uint8),
                       torch.arange(n), 255.0)  # the label is the example's index
    batches = data.Batches(split, 64, shuffle=True, drop_last=False, generator=torch.Generator().manual_seed(0))
    first, second = (torch.cat([y for _, y in batches]) for _ in range(2))
    assert sorted(first.tolist()) == list(range(n)) and sorted(second.tolist()) == list(range(n))
    assert not torch.equal(first, second) and not torch.equal(first, torch.arange(n))
    for x, y in batches:  # images travel with their labels
        assert torch.equal(x.flatten(), (y % 256).float() / 255)
    dropped = torch.cat([y for _, y in data.Batches(split, 64, shuffle=True, drop_last=True)])
    assert len(dropped) == 256 and len(set(dropped.tolist())) == 256


def test_shuffle_depends_on_the_generator_only():
    def first_labels(seed):
        gen = torch.Generator().manual_seed(seed)
        return next(iter(_digits_batches(batch_size=64, shuffle=True, drop_last=True, generator=gen)))[1]
    assert torch.equal(first_labels(3), first_labels(3))
    assert not torch.equal(first_labels(3), first_labels(4))


def test_default_generator_follows_torch_manual_seed():
    def first_batch():
        return next(iter(_digits_batches(batch_size=64, shuffle=True, drop_last=True, crop_padding=2)))[0]
    torch.manual_seed(11)
    a = first_batch()
    torch.manual_seed(11)
    assert torch.equal(a, first_batch())
    torch.manual_seed(12)
    assert not torch.equal(a, first_batch())


def test_restoring_the_generator_state_replays_an_epoch():
    batches = _digits_batches(batch_size=200, shuffle=True, drop_last=True, crop_padding=2, hflip=True,
                              generator=torch.Generator().manual_seed(0))
    list(batches)  # epoch 1
    state = batches.generator.get_state()
    epoch2 = list(batches)
    replay = _digits_batches(batch_size=200, shuffle=True, drop_last=True, crop_padding=2, hflip=True,
                             generator=torch.Generator().manual_seed(99))
    replay.generator.set_state(state)
    for (x1, y1), (x2, y2) in zip(epoch2, replay, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_store_on_device_gives_the_same_batches_on_cpu():
    kw = {"batch_size": 128, "shuffle": True, "drop_last": True, "crop_padding": 2, "hflip": True}
    a = _digits_batches(**kw, generator=torch.Generator().manual_seed(1))
    b = _digits_batches(**kw, store_on_device=True, generator=torch.Generator().manual_seed(1))
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def _constant_split(n=512, value=255, side=8):
    images = torch.full((n, 1, side, side), value, dtype=torch.uint8)
    images[:, :, :, : side // 2] = 0  # left half dark: flips are visible
    return data.Split(images, torch.zeros(n, dtype=torch.long), 255.0)


def test_random_crop_pads_with_zeros_and_varies_offsets():
    split = data.Split(torch.full((512, 1, 8, 8), 255, dtype=torch.uint8), torch.zeros(512, dtype=torch.long), 255.)
    gen = torch.Generator().manual_seed(0)
    (x, _), = data.Batches(split, 512, shuffle=False, drop_last=True, crop_padding=2, generator=gen)
    assert x.min() >= 0 and x.max() <= 1 and set(x.unique().tolist()) == {0.0, 1.0}
    ones = x[:, 0] == 1
    top_zero_rows = (~ones).all(dim=2).int().cumprod(dim=1).sum(1)  # zero rows from the top
    left_zero_cols = (~ones).all(dim=1).int().cumprod(dim=1).sum(1)
    bottom_zero_rows = (~ones).all(dim=2).flip(1).int().cumprod(dim=1).sum(1)
    right_zero_cols = (~ones).all(dim=1).flip(1).int().cumprod(dim=1).sum(1)
    for band in (top_zero_rows, left_zero_cols, bottom_zero_rows, right_zero_cols):
        assert band.max() <= 2
    assert ones[:, 2:6, 2:6].all()  # the centre is never padding
    zeros_expected = 64 - (8 - top_zero_rows - bottom_zero_rows) * (8 - left_zero_cols - right_zero_cols)
    assert torch.equal((~ones).sum((1, 2)), zeros_expected)  # zeros only in those border bands
    assert len(set(zip(top_zero_rows.tolist(), left_zero_cols.tolist()))) > 5  # offsets vary
    assert (x.sum((1, 2, 3)) < 64).float().mean() > 0.5  # most crops include some padding


def test_crop_and_flip_are_windows_of_the_padded_image():
    """Every output is a (possibly mirrored) 8x8 window of the zero-padded image; all 25 windows occur."""
    side, p = 8, 2
    image = torch.arange(1, side * side + 1, dtype=torch.uint8).reshape(1, 1, side, side)  # distinct pixels
    split = data.Split(image.repeat(2000, 1, 1, 1), torch.zeros(2000, dtype=torch.long), 255.0)
    gen = torch.Generator().manual_seed(0)
    (x, _), = data.Batches(split, 2000, shuffle=False, drop_last=True, crop_padding=p, hflip=True, generator=gen)
    padded = torch.nn.functional.pad(image.float() / 255, (p, p, p, p))[0, 0]
    windows = {(dy, dx, f): padded[dy:dy + side, dx:dx + side].flip(1) if f else padded[dy:dy + side, dx:dx + side]
               for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (0, 1)}
    seen = []
    for crop in x[:, 0]:
        match = [key for key, window in windows.items() if torch.equal(crop, window)]
        assert len(match) == 1
        seen.append(match[0])
    counts = np.bincount([dy * 5 + dx for dy, dx, _ in seen], minlength=25)
    assert counts.min() > 40  # 2000 draws of 25 equally likely offsets: about 80 each
    assert 0.45 < np.mean([f for _, _, f in seen]) < 0.55


def test_horizontal_flip_hits_about_half():
    gen = torch.Generator().manual_seed(0)
    (x, _), = data.Batches(_constant_split(), 512, shuffle=False, drop_last=True, hflip=True, generator=gen)
    flipped = (x[:, 0, :, 0] == 1).all(1)  # the bright half moved to the left
    assert 0.4 < flipped.float().mean() < 0.6
    assert ((x[:, 0, :, 0] == 0).all(1) | flipped).all()
    assert torch.equal(x[flipped], x[flipped.logical_not()][:1].flip(3).expand(int(flipped.sum()), -1, -1, -1))


def test_no_augmentation_gives_exact_pixels():
    split = data.load_split("digits", "", True)
    (x, y), *_ = data.Batches(split, 1400, shuffle=False, drop_last=False, crop_padding=0, hflip=False)
    assert torch.equal(x, split.images.float() / 16) and torch.equal(y, split.labels)
    assert x.min() == 0 and x.max() == 1
