"""The later methods' networks against their official classes, restated here from the official code
(pdejorge/N-FGSM architectures/, rohban-lab/catastrophic_overfitting preactresnet.py, LIONS-EPFL/ELLE
core/models/): a state_dict saved from one loads strictly into eval.py's --model and predicts the
same; `--protocol own` trains the authors' network and writes weights their class loads; MultiGrad
against its official update; the augmentations of --augment.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import config
import data
import methods
import models
import train
import utils
from tests.fixtures import eval_main, write_cifar10, write_cifar100, write_svhn


# ------------------------------------------------------------------- the official classes, restated
class RefPreActUnit(nn.Module):
    """A pre-activation basic block; the projection (a Sequential holding one 1x1 conv) sees the raw
    input (N-FGSM) or the activated input (Rice et al.)."""

    def __init__(self, cin: int, cout: int, stride: int, project_activated: bool):
        super().__init__()
        self.project_activated = project_activated
        self.bn1 = nn.BatchNorm2d(cin)  # registered in the official order: the key order of the state_dict
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride > 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        skip = x if not hasattr(self, "shortcut") else self.shortcut(a if self.project_activated else x)
        return self.conv2(torch.relu(self.bn2(self.conv1(a)))) + skip


class RefPreActResNet18(nn.Module):
    """conv -> 4 stages of 2 units -> BN -> ReLU -> 4x4 average -> linear (PyTorch's default init)."""

    def __init__(self, n_classes: int, project_activated: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        cin = 64
        for stage, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
            self.add_module(f"layer{stage}", nn.Sequential(RefPreActUnit(cin, cout, stride, project_activated),
                                                           RefPreActUnit(cout, cout, 1, project_activated)))
            cin = cout
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, n_classes)

    def forward(self, x):
        h = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(F.avg_pool2d(torch.relu(self.bn(h)), 4).view(len(x), -1))


class RefNFWideUnit(nn.Module):
    """meliketoy's wide block as N-FGSM ships it: biased convs, dropout after the first, the stride on
    the second, a biased 1x1 projection of the raw input (an empty Sequential when not needed)."""

    def __init__(self, cin: int, cout: int, stride: int, p: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=True)
        self.dropout = nn.Dropout(p)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=True)
        needs = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*([nn.Conv2d(cin, cout, 1, stride, bias=True)] if needs else []))

    def forward(self, x):
        h = self.dropout(self.conv1(torch.relu(self.bn1(x))))
        return self.conv2(torch.relu(self.bn2(h))) + self.shortcut(x)


class RefNFWideResNet(nn.Module):
    def __init__(self, depth: int, k: int, p: float, n_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=True)
        cin = 16
        for stage, (cout, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
            units = [RefNFWideUnit(cin if j == 0 else cout, cout, stride if j == 0 else 1, p) for j in range(n)]
            self.add_module(f"layer{stage}", nn.Sequential(*units))
            cin = cout
        self.bn1 = nn.BatchNorm2d(64 * k, momentum=0.9)
        self.linear = nn.Linear(64 * k, n_classes)

    def forward(self, x):
        h = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.linear(F.avg_pool2d(torch.relu(self.bn1(h)), 8).view(len(x), -1))


class RefZagoruykoUnit(nn.Module):
    """Zagoruyko's block (ELLE's and ZeroGrad's wideresnet.py): where the width changes, both the
    residual branch and the 1x1 convShortcut read relu(bn1(x)); otherwise the shortcut is x."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        h = self.conv2(torch.relu(self.bn2(self.conv1(a))))
        return h + (x if self.equal else self.convShortcut(a))


class RefGroup(nn.Module):
    def __init__(self, units):
        super().__init__()
        self.layer = nn.Sequential(*units)

    def forward(self, x):
        return self.layer(x)


class RefZagoruykoWRN(nn.Module):
    def __init__(self, depth: int, k: int, n_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        cin = 16
        for stage, (cout, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
            self.add_module(f"block{stage}", RefGroup([RefZagoruykoUnit(cin if j == 0 else cout, cout,
                                                                        stride if j == 0 else 1) for j in range(n)]))
            cin = cout
        self.bn1 = nn.BatchNorm2d(64 * k)
        self.fc = nn.Linear(64 * k, n_classes)

    def forward(self, x):
        h = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.avg_pool2d(torch.relu(self.bn1(h)), 8).view(len(x), -1))


# (--model, its restated official class, extra eval.py flags); the wide ones at a small width
OFFICIAL = {
    "resnet18_nfgsm": (lambda c: RefPreActResNet18(c, project_activated=False), []),
    "resnet18_rice": (lambda c: RefPreActResNet18(c, project_activated=True), []),
    "wrn28_10_nfgsm": (lambda c: RefNFWideResNet(10, 2, 0.3, c), ["--wrn_depth", "10", "--wrn_width", "2"]),
    "wrn28_10": (lambda c: RefZagoruykoWRN(34, 1, c), ["--wrn_depth", "34", "--wrn_width", "1"]),
}


def trained_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """net with non-trivial BatchNorm running statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(7)
    return net.eval()


def normalized(x: torch.Tensor, name: str) -> torch.Tensor:
    """What the authors' data pipelines feed their networks: (x - mean) / std outside the model."""
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in models.NORMALIZATIONS[name])
    return (x - mean) / std


def test_the_restated_classes_have_the_keys_of_this_repos_models():
    for name, (official, extra) in OFFICIAL.items():
        flags = dict(zip(extra[::2], extra[1::2]))
        ours = models.build_model(name, 10, (3, 32, 32), wrn_depth=int(flags.get("--wrn_depth", 28)),
                                  wrn_width=int(flags.get("--wrn_width", 10)))
        theirs = official(10).state_dict()
        assert list(ours.state_dict()) == list(theirs), name
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    assert len(models.build_model("resnet18_nfgsm", 10, (3, 32, 32)).state_dict()) == 107


def test_the_later_methods_networks_keep_pytorchs_default_init():
    torch.manual_seed(3)
    ours = models.build_model("resnet18_rice", 10, (3, 32, 32))
    torch.manual_seed(3)
    theirs = RefPreActResNet18(10, project_activated=True)
    for (key, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), key  # the same draws in the same order: no re-initialisation
    logits = ours.train()(torch.rand(4, 3, 32, 32))
    assert logits.std() < 0.6  # the small logits of the default init (the GA model's are about 4x larger)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith("resnet") else n
                                  for n in OFFICIAL])  # the ResNet-18s' PGD pass costs seconds on a CPU
def test_an_official_state_dict_evaluates_strictly_and_predicts_as_its_class(name, tmp_path, capsys):
    official, extra = OFFICIAL[name]
    net = trained_statistics(official(10))
    write_cifar10(tmp_path, [[0]] * 5, [0] * 8)  # eval_main evaluates 8 points
    x = data.load_split("cifar10", str(tmp_path), train=False).images.float() / 255
    with torch.no_grad():
        expected = net(normalized(x, "cifar10"))
    # test labels: the class's own predictions on the first 4 points, another class on the last 4
    # (the same seed writes the same pixels whatever the labels)
    predicted = expected.argmax(1)
    write_cifar10(tmp_path, [[0]] * 5, torch.cat([predicted[:4], (predicted[4:] + 1) % 10]).tolist())
    assert torch.equal(data.load_split("cifar10", str(tmp_path), train=False).images.float() / 255, x)
    path = tmp_path / "official.pth"
    torch.save(net.state_dict(), path)  # a plain state_dict, as their train scripts save it
    # this repo's model: strict load, the same logits
    flags = dict(zip(extra[::2], extra[1::2]))
    ours = models.build_model(name, 10, (3, 32, 32), normalize="cifar10", wrn_depth=int(flags.get("--wrn_depth", 28)),
                              wrn_width=int(flags.get("--wrn_width", 10)))
    models.load_state(ours, models.read_checkpoint(str(path)))
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), expected)
    # eval.py: 4 of 8 right, exactly the restated class's predictions
    code, out, err = eval_main(capsys, "--model_path", str(path), "--dataset", "cifar10", "--data_dir", str(tmp_path),
                               "--model", name, "--normalize", "cifar10", "--eps", "0", *extra)
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["clean_acc"] == pytest.approx(0.5)


def test_a_checkpoint_of_another_network_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "zagoruyko.pth"
    torch.save(RefZagoruykoWRN(10, 1, 10).state_dict(), path)
    write_cifar10(tmp_path, [[0]] * 5, [0] * 8)
    code, _, err = eval_main(capsys, "--model_path", str(path), "--dataset", "cifar10", "--data_dir", str(tmp_path),
                             "--model", "wrn28_10_nfgsm", "--wrn_depth", "10", "--wrn_width", "1", "--eps", "0")
    assert code == 2 and "missing keys" in err and "unexpected keys block1" in err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------------- the protocols
def resolved(argv: list[str]):
    cfg, _ = config.config_and_defaults(config.build_parser().parse_args(argv))
    return cfg


@pytest.mark.parametrize(("method", "dataset", "model", "augment"), [
    ("nfgsm", "cifar10", "resnet18_nfgsm", "dataset"), ("nfgsm", "svhn", "resnet18_nfgsm", "dataset"),
    ("zerograd", "cifar10", "resnet18_rice", "reflect"), ("zerograd", "cifar100", "resnet18_rice", "rotate"),
    ("zerograd", "svhn", "resnet18_rice", "none"), ("multigrad", "cifar10", "resnet18_rice", "reflect"),
    ("elle_a", "cifar10", "resnet18_rice", "dataset"), ("fgsm", "cifar10", "resnet18", "dataset"),
])
def test_own_protocol_names_the_authors_network_and_pipeline(method, dataset, model, augment):
    words = methods.flags(method, 8, dataset) + [f"--dataset={dataset}"]
    own = resolved(words + ["--protocol", "own"])
    assert (own.model, own.augment) == (model, augment)
    paper = resolved(words)
    assert (paper.model, paper.augment) == ("resnet18", "dataset")  # this paper's protocol is unchanged
    # an explicit --model (and --augment) overrides the protocol's; config.json records what was used
    explicit = resolved(words + ["--protocol", "own", "--model", "resnet18", "--augment", "none"])
    assert (explicit.model, explicit.augment) == ("resnet18", "none")
    assert config.record(explicit)["model"] == "resnet18" and config.record(explicit)["augment"] == "none"
    if augment != "dataset":
        assert config.record(own)["augment"] == augment


def test_own_protocol_sweep_words_name_the_network():
    words = methods.flags("zerograd", 8, "cifar10", protocol="own")
    assert "--model=resnet18_rice" in words and "--protocol=own" in words
    assert "--model=wrn28_10" in methods.flags("nfgsm", 16, "cifar10", model="wrn28_10", protocol="own")
    assert not any(w.startswith("--model") for w in methods.flags("nfgsm", 8, "cifar10"))
    assert methods.flags("nfgsm", 8, "svhn")[-2:] == ["--epochs=30", "--lr_max=0.05"]  # its code's SVHN epochs
    assert "--nfgsm_noise_mult=4" in methods.flags("nfgsm", 16, "cifar10", model="wrn28_10_nfgsm")


@pytest.mark.parametrize("flags", [
    ["--wrn_depth", "34"], ["--model", "wrn28_10", "--wrn_depth", "30"], ["--model", "wrn28_10", "--wrn_width", "0"],
    ["--multigrad_samples", "3", "--multigrad_agree", "4"], ["--multigrad_agree", "2"],
    ["--multigrad_samples", "3", "--zerograd_q", "0.35"], ["--attack", "pgd", "--multigrad_samples", "3"],
    ["--augment", "rotated"],
])
def test_bad_network_and_multigrad_flags_are_one_line_exit_2(cli, tmp_path, flags):
    result = cli("train.py", "--dataset", "digits", "--model", "cnn", "--out_dir", tmp_path, *flags)
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------ MultiGrad
def official_multigrad(model, x, y, eps, alpha, samples, threshold):
    """The official sequential MultiGrad update, restated: per sample a box-projected uniform start
    and the gradient of the mean CE there; the signs are summed, coordinates below 2t - s zeroed, and
    the step taken from zero, clipped to eps and to the box."""
    signs = []
    for _ in range(samples):
        d = torch.zeros_like(x).uniform_(-eps, eps)
        d = (torch.min(torch.max(x + d, torch.zeros_like(x)), torch.ones_like(x)) - x).requires_grad_(True)
        F.cross_entropy(model(x + d), y).backward()
        signs.append(torch.sign(d.grad))
    g = sum(signs)
    g = torch.where(g.abs() < threshold - (samples - threshold), torch.zeros_like(g), g)
    step = torch.clamp(alpha * torch.sign(g), -eps, eps)
    return (torch.min(torch.max(x + step, torch.zeros_like(x)), torch.ones_like(x)) - x).detach()


@pytest.mark.parametrize(("samples", "agree"), [(3, 3), (4, 3), (1, 1)])
def test_multigrad_matches_its_official_update(samples, agree):
    torch.manual_seed(0)
    model = models.build_model("cnn_bn", 10, (1, 8, 8), 1, 4).train()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    x[:, :, :2] = 0.0  # saturated pixels: the starts are projected onto the box
    eps = 0.3
    torch.manual_seed(5)
    expected = official_multigrad(model, x, y, eps, 2 * eps, samples, agree)
    torch.manual_seed(5)
    delta, grad, start = utils.multigrad_attack(model, x, y, eps, 2 * eps, samples, agree)
    assert torch.equal(delta, expected)
    assert delta.abs().max() <= eps + 1e-7 and (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert grad.shape == x.shape and ((x + start) >= 0).all()
    if samples > 1:
        assert (delta == 0).float().mean() > 0.05  # some coordinates lost the vote and stay at zero


def test_multigrad_is_a_registry_entry_with_its_cost():
    cfg = resolved(methods.flags("multigrad", 8, "cifar10"))
    perturbation, regulariser = methods.select(cfg)
    assert perturbation.name == "multigrad" and regulariser is None
    assert methods.label_of(cfg) == "MultiGrad" and methods.passes_of(cfg) == "3+1"
    assert methods.own_protocol(cfg, "svhn") == methods.ZEROGRAD_OWN["svhn"]
    assert "multigrad" in methods.recipes() and methods.recipes()["multigrad"].listed


# --------------------------------------------------------------------------------- augmentations
def test_reflect_crop_matches_numpys_reflect_pad():
    x = torch.rand(3, 3, 6, 6)
    offsets = torch.tensor([[0, 4, 8], [8, 1, 4]])
    got = data.batch_crop(x, 4, offsets, "reflect")
    padded = np.pad(x.numpy(), [(0, 0), (0, 0), (4, 4), (4, 4)], mode="reflect")
    for i in range(3):
        r, c = offsets[:, i].tolist()
        assert np.array_equal(got[i].numpy(), padded[i, :, r:r + 6, c:c + 6])


def test_rotation_by_right_angles_and_zero_and_its_fill():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(data.batch_rotate(x, torch.zeros(2)), x)
    quarter = data.batch_rotate(x, torch.tensor([90.0, -90.0]))
    turns = {torch.rot90(x[0], k, (1, 2)).numpy().tobytes(): k for k in (1, -1)}
    k0 = turns.get(quarter[0].numpy().tobytes())
    assert k0 is not None and torch.equal(quarter[1], torch.rot90(x[1], -k0, (1, 2)))  # a quarter turn each way
    tilted = data.batch_rotate(torch.ones(1, 1, 32, 32), torch.tensor([15.0]))
    assert tilted[0, 0, 0, 0] == 0 and tilted[0, 0, 16, 16] == 1  # corners leave the frame, the centre stays
    assert 0.8 < tilted.mean() < 1  # only the corners are lost
    assert set(tilted.unique().tolist()) == {0.0, 1.0}  # nearest neighbour: no blending


def test_augment_choices_draw_only_what_they_use():
    info = data.DATASETS["cifar100"]
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    split = data.Split(images, torch.zeros(8, dtype=torch.long), 255.0)

    def first(name):
        gen = torch.Generator().manual_seed(0)
        batches = data.Batches(split, 8, shuffle=True, drop_last=True, generator=gen, **data.augmentation(name, info))
        return next(iter(batches))[0], gen.get_state()
    plain, plain_state = first("dataset")
    reflect, reflect_state = first("reflect")
    rotate, rotate_state = first("rotate")
    none, _ = first("none")
    assert torch.equal(plain_state, reflect_state) and not torch.equal(plain_state, rotate_state)
    assert not torch.equal(plain, reflect) and not torch.equal(plain, rotate)
    assert (reflect == 0).sum() < (plain == 0).sum()  # reflection pads with image pixels, not zeros
    assert torch.equal(none.sort(0).values, (split.images.float() / 255).sort(0).values)  # only shuffled


# ------------------------------------------------------------------- --protocol own runs, end to end
SMALL = ["--epochs", "1", "--batch_size", "8", "--n_eval_every_k_iter", "8", "--eval_iter_freq", "100",
         "--attack_iters", "1", "--n_final_eval", "2", "--batch_size_eval", "2", "--device", "cpu", "--debug"]


def tiny_dataset(root, dataset: str, n: int = 8) -> None:
    """n training images (one batch of SMALL) and 4 test images in the dataset's real file format."""
    labels = [int(v) for v in np.random.default_rng(0).integers(0, 100 if dataset == "cifar100" else 10, n)]
    if dataset == "cifar100":
        write_cifar100(root, labels, labels[:4])
    else:
        write_svhn(root, [1 + label % 10 for label in labels], [1, 2, 3, 4])


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["cifar100", "svhn"])
@pytest.mark.parametrize(("method", "project_activated"), [("nfgsm", False), ("zerograd", True), ("elle", True)])
def test_one_epoch_under_each_own_protocol_trains_the_authors_network(method, project_activated, dataset, tmp_path):
    """One step (and epoch 0's) under the method's own protocol on tiny files in the real formats: no divergence
    (exit 4 would say the loss became NaN or inf), and model.pth loads strictly into the restated
    official class and gives the same logits."""
    tiny_dataset(tmp_path, dataset)
    argv = [*methods.flags(method, 8, dataset, protocol="own"), "--dataset", dataset, "--data_dir", str(tmp_path),
            "--out_dir", str(tmp_path / "runs"), *SMALL]
    assert train.main(argv) == 0
    (run_dir,) = os.listdir(tmp_path / "runs")
    with open(tmp_path / "runs" / run_dir / "config.json") as f:
        recorded = json.load(f)
    cfg = resolved(argv)
    assert recorded["model"] == cfg.model == ("resnet18_rice" if project_activated else "resnet18_nfgsm")
    assert recorded.get("augment", "dataset") == cfg.augment  # ZeroGrad's: rotate on CIFAR-100, none on SVHN
    with open(tmp_path / "runs" / run_dir / "final.json") as f:
        assert 0 <= json.load(f)["last"]["clean_acc"] <= 1
    state = torch.load(tmp_path / "runs" / run_dir / "model.pth", weights_only=True)["last"]
    n_classes = data.DATASETS[dataset].n_classes
    theirs = RefPreActResNet18(n_classes, project_activated=project_activated)
    theirs.load_state_dict(state, strict=True)
    ours = models.build_model(cfg.model, n_classes, (3, 32, 32), normalize=cfg.normalize)
    models.load_state(ours, state)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs.eval()(normalized(x, cfg.normalize)))


def test_elles_checkpoint_format_loads_strictly(tmp_path):
    net = trained_statistics(RefPreActResNet18(10, project_activated=True))
    path = tmp_path / "val_best.pt"  # ELLE's train.py saves {'model': ..., 'val_best', 'epoch'}, keys '0.*'
    torch.save({"model": {f"0.{k}": v for k, v in net.state_dict().items()}, "val_best": 0.4, "epoch": 29}, path)
    ours = models.build_model("resnet18_rice", 10, (3, 32, 32))
    models.load_state(ours, models.read_checkpoint(str(path)))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), net(x))
    with pytest.raises(models.CheckpointError, match="no 'best'"):
        models.read_checkpoint(str(path), "best")
