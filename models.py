"""The two architectures of the paper (arXiv 2007.02617), with the state_dict keys of the authors' code,
the later methods' networks with the state_dict keys of their authors' classes (docs/later_methods.md
names each source file), and a small BatchNorm CNN for the digits demo.

Every model takes images of shape (B, C, H, W) with values in [0, 1] and returns logits (B, n_classes).
The paper's two register an alias submodule `model_preact_hl1` that points at their first layers,
exactly as the authors' code does, so that the authors' released checkpoints load with strict=True.
"""
from __future__ import annotations

import math
import pickle
import re

import torch
import torch.nn.functional as F
from torch import nn

MODELS = ("resnet18", "cnn", "cnn_bn", "wrn28_10", "resnet18_nfgsm", "resnet18_rice", "wrn28_10_nfgsm")
# the wide networks: --wrn_depth and --wrn_width set their depth and width (28 and 10 by default)
WIDE_MODELS = ("wrn28_10", "wrn28_10_nfgsm")
# the later methods' networks, which keep PyTorch's default initialisation as their authors' code does
DEFAULT_INIT_MODELS = ("resnet18_nfgsm", "resnet18_rice", "wrn28_10_nfgsm")

# Input normalisations (--normalize): per-channel (mean, std) of inputs in [0, 1]. none is the paper's.
# cifar10: the CIFAR-10 training set's, as N-FGSM's and ZeroGrad's code; cifar100: N-FGSM's CIFAR-100
# values (ZeroGrad's agree to these 4 decimals); svhn: N-FGSM's SVHN values; half: 0.5 and 0.5, ZeroGrad's
# SVHN code.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.4380, 0.4440, 0.4730), (0.1751, 0.1771, 0.1744)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean 0 and std 1 in the paper. Not part of the state_dict, so a
    model keeps the authors' keys whatever its normalisation. At mean 0 and std 1 it is the identity
    (x - 0) / 1 = x, exactly."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def identity_normalize(channels: int) -> Normalize:
    return Normalize((0.0,) * channels, (1.0,) * channels)


class PreActBlock(nn.Module):
    """bn1 -> relu -> conv1 -> bn2 -> relu -> conv2, plus a shortcut: of the block's raw input (the
    GradAlign and N-FGSM authors' block), or with shortcut_of_act of relu(bn1(x)) (He et al.'s
    pre-activation block, as in Rice et al.'s code that ZeroGrad and ELLE use). Where the shape is
    unchanged the shortcut is x itself in both."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut_of_act: bool = False):
        super().__init__()
        self.shortcut_of_act = shortcut_of_act
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        if not hasattr(self, "shortcut"):
            return out + x
        # The GradAlign authors' shortcut takes the block input x, not relu(bn1(x)) as in He et al.
        return out + self.shortcut(act if self.shortcut_of_act else x)


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 of the authors' code: no final BN/ReLU, avg_pool2d(4), linear 512 -> n_classes.

    Input (B, 3, S, S) with 25 <= S <= 56 (32 in practice); state_dict of 108 keys.
    """

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.normalize = Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        widths, strides, in_planes = (64, 128, 256, 512), (1, 2, 2, 2), 64
        for i, (width, stride) in enumerate(zip(widths, strides), start=1):
            blocks = [PreActBlock(in_planes, width, stride), PreActBlock(width, width, 1)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = width
        self.linear = nn.Linear(512, n_classes)
        # Alias of the first layers, registered last as in the authors' code (adds 6 state_dict keys).
        self.model_preact_hl1 = nn.Sequential(self.normalize, self.conv1, self.layer1[0].bn1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.linear(out.flatten(1))


class PreActResNet18Final(nn.Module):
    """The later methods' PreAct ResNet-18: the paper's stages, then a final BatchNorm + ReLU before
    avg_pool2d(4) and linear 512 -> n_classes, and PyTorch's default initialisation.

    shortcut_of_act False: N-FGSM's network (the shortcut convolution takes the block's raw input);
    True: Rice et al.'s, which ZeroGrad's and ELLE's code train (it takes relu(bn1(x))). Keys conv1.*,
    layer{1..4}.{0,1}.*, bn.* and linear.*: 107 in all, those of the authors' classes. Input
    (B, 3, S, S) with 25 <= S <= 56 (32 in practice).
    """

    def __init__(self, n_classes: int = 10, shortcut_of_act: bool = False):
        super().__init__()
        self.normalize = identity_normalize(3)
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        widths, strides, in_planes = (64, 128, 256, 512), (1, 2, 2, 2), 64
        for i, (width, stride) in enumerate(zip(widths, strides), start=1):
            blocks = [PreActBlock(in_planes, width, stride, shortcut_of_act),
                      PreActBlock(width, width, 1, shortcut_of_act)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = width
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(F.relu(self.bn(out)), 4)
        return self.linear(out.flatten(1))


class CNN(nn.Module):
    """n_conv x [Conv2d(3x3, stride 1, pad 1, bias), ReLU], Flatten, Linear(n_filters*H*W -> n_classes).

    Input (B, C, H, W) of any size; keys _model.0.*, _model.{2*n_conv+1}.* and the alias
    model_preact_hl1.0.* (the first conv): 6 keys for one layer, the authors' only depth.
    """

    def __init__(self, n_classes: int, shape_in: tuple[int, int, int], n_conv: int = 1, n_filters: int = 16):
        super().__init__()
        channels, height, width = shape_in
        layers: list[nn.Module] = []
        for i in range(n_conv):
            layers += [nn.Conv2d(channels if i == 0 else n_filters, n_filters, 3, 1, 1, bias=True), nn.ReLU()]
        layers += [nn.Flatten(), nn.Linear(n_filters * height * width, n_classes)]
        self._model = nn.Sequential(*layers)
        self.model_preact_hl1 = nn.Sequential(self._model[0])
        self.normalize = identity_normalize(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model(self.normalize(x))

    def first_layer_filters(self) -> torch.Tensor:
        """Weights of the first conv, (n_filters, C, 3, 3)."""
        return self._model[0].weight


class CNNBN(nn.Module):
    """n_conv x [Conv2d(3x3, stride 1, pad 1, no bias), BatchNorm2d, ReLU], Flatten, Linear -> n_classes.

    Not in the paper: a small model with BatchNorm for the offline digits demo. Like the paper's deep
    network (and unlike the single-layer CNN), GradAlign cannot make its input gradients agree by
    switching every ReLU off, since BatchNorm re-centres each channel on every batch. Keys _model.*.
    """

    def __init__(self, n_classes: int, shape_in: tuple[int, int, int], n_conv: int = 2, n_filters: int = 16):
        super().__init__()
        channels, height, width = shape_in
        layers: list[nn.Module] = []
        for i in range(n_conv):
            layers += [nn.Conv2d(channels if i == 0 else n_filters, n_filters, 3, 1, 1, bias=False),
                       nn.BatchNorm2d(n_filters), nn.ReLU()]
        layers += [nn.Flatten(), nn.Linear(n_filters * height * width, n_classes)]
        self._model = nn.Sequential(*layers)
        self.normalize = identity_normalize(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model(self.normalize(x))

    def first_layer_filters(self) -> torch.Tensor:
        """Weights of the first conv, (n_filters, C, 3, 3)."""
        return self._model[0].weight


class WideBlock(nn.Module):
    """Pre-activation wide block: bn1 -> relu -> conv1 (3x3, stride) -> bn2 -> relu -> conv2 (3x3).

    Where the width or the stride changes, the shortcut is a 1x1 conv (convShortcut) of relu(bn1(x)),
    otherwise x itself (Zagoruyko & Komodakis's design, as in the later methods' official code:
    docs/later_methods.md says which).
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.same_shape = in_planes == planes
        if not self.same_shape:
            self.convShortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.same_shape else self.convShortcut(act))


class WideGroup(nn.Module):
    """n_blocks wide blocks; the first changes the width and applies the stride. Keys layer.<i>.*."""

    def __init__(self, n_blocks: int, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                                     for i in range(n_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-width (pre-activation, no dropout): conv1 (3 -> 16), three groups of
    (depth - 4) / 6 blocks of widths 16, 32 and 64 times `width` (strides 1, 2, 2), then BatchNorm,
    ReLU, avg_pool2d(8) and a linear layer. Depth 28, width 10: 4 blocks per group, widths 160, 320,
    640, 36.5M parameters. The state_dict keys are those of the later methods' official WideResNet (conv1,
    block{1,2,3}.layer.<i>.*, bn1, fc). Input (B, 3, S, S) with 29 <= S <= 60 (32 in practice).
    """

    def __init__(self, n_classes: int = 10, depth: int = 28, width: int = 10):
        super().__init__()
        n_blocks = _wide_blocks(depth, width)
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideGroup(n_blocks, 16, widths[0], 1)
        self.block2 = WideGroup(n_blocks, widths[0], widths[1], 2)
        self.block3 = WideGroup(n_blocks, widths[1], widths[2], 2)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], n_classes)
        self.normalize = identity_normalize(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


class WideBlockNF(nn.Module):
    """N-FGSM's wide block: bn1 -> relu -> conv1 (3x3, bias) -> dropout -> bn2 -> relu -> conv2 (3x3,
    stride, bias), plus a shortcut of the block's raw input: a 1x1 conv with bias (shortcut.0) where the
    width or the stride changes, else x itself."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        return self.conv2(F.relu(self.bn2(out))) + self.shortcut(x)


class WideResNetNF(nn.Module):
    """N-FGSM's WideResNet-depth-width: conv1 (3x3, 3 -> 16, bias), three stages layer{1,2,3} of
    (depth - 4) / 6 WideBlockNF of widths 16, 32 and 64 times `width` (the stride on the first block's
    second conv), then BatchNorm (bn1, momentum 0.9: its running statistics are 90% the last batch's),
    ReLU, avg_pool2d(8) and linear. Dropout 0.3 after each block's first conv, active in train mode
    (so in the training attacks too). PyTorch's default initialisation. Keys conv1.*, layer{1,2,3}.<i>.*,
    bn1.*, linear.*. Input (B, 3, S, S) with 29 <= S <= 60 (32 in practice).
    """

    def __init__(self, n_classes: int = 10, depth: int = 28, width: int = 10, dropout: float = 0.3):
        super().__init__()
        n_blocks = _wide_blocks(depth, width)
        widths = (16 * width, 32 * width, 64 * width)
        self.normalize = identity_normalize(3)
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=True)
        in_planes = 16
        for i, (planes, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [WideBlockNF(in_planes if j == 0 else planes, planes, stride if j == 0 else 1, dropout)
                      for j in range(n_blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            in_planes = planes
        self.bn1 = nn.BatchNorm2d(widths[2], momentum=0.9)
        self.linear = nn.Linear(widths[2], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(self.normalize(x)))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.linear(out.flatten(1))


def _wide_blocks(depth: int, width: int) -> int:
    """Blocks per stage of a WideResNet-depth-width; ValueError unless depth = 6n + 4 >= 10, width >= 1."""
    if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
        raise ValueError(f"a WideResNet needs depth 6n + 4 >= 10 and width >= 1 (got {depth}, {width}): "
                         "set --wrn_depth (e.g. 28 or 34) and --wrn_width (e.g. 10)")
    return (depth - 4) // 6


def init_weights(module: nn.Module) -> None:
    """The authors' initialisation, applied to every module with model.apply.

    Conv2d: N(0, sqrt(2 / (k*k*out_channels))), bias 0. Linear: N(0, sqrt(2 / in_features)), bias 0.
    BatchNorm: weight 1, bias 0.
    """
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.BatchNorm2d):
        module.weight.data.fill_(1)
        module.bias.data.zero_()
    elif isinstance(module, nn.Linear):
        module.weight.data.normal_(0, math.sqrt(2.0 / module.in_features))
        module.bias.data.zero_()


def build_model(name: str, n_classes: int, shape_in: tuple[int, int, int],
                n_layers: int = 1, n_filters_cnn: int = 16, normalize: str = "none",
                wrn_depth: int = 28, wrn_width: int = 10) -> nn.Module:
    """A freshly initialised model whose first module normalises its input by NORMALIZATIONS[normalize].

    The paper's models and wrn28_10 get the GradAlign authors' init (including its second pass over
    the aliases); wrn28_10's convolutions and BatchNorms are then as in ELLE's and ZeroGrad's code, its
    linear layer N(0, sqrt(2 / in_features)) where theirs keeps PyTorch's default (bias 0 in both). The
    later methods' networks (DEFAULT_INIT_MODELS) keep PyTorch's default init, as their authors' code.
    wrn_depth, wrn_width: of the wide models (WIDE_MODELS) only.
    """
    if name == "resnet18":
        model = PreActResNet18(n_classes)
    elif name in ("resnet18_nfgsm", "resnet18_rice"):
        model = PreActResNet18Final(n_classes, shortcut_of_act=name == "resnet18_rice")
    elif name == "wrn28_10":
        model = WideResNet(n_classes, depth=wrn_depth, width=wrn_width)
    elif name == "wrn28_10_nfgsm":
        model = WideResNetNF(n_classes, depth=wrn_depth, width=wrn_width)
    elif name == "cnn":
        model = CNN(n_classes, shape_in, n_conv=n_layers, n_filters=n_filters_cnn)
    elif name == "cnn_bn":
        model = CNNBN(n_classes, shape_in, n_conv=n_layers, n_filters=n_filters_cnn)
    else:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    if name not in DEFAULT_INIT_MODELS:
        model.apply(init_weights)
    set_normalization(model, normalize)
    return model


def normalization_problem(normalize: str, channels: int) -> str | None:
    """Why --normalize cannot apply to inputs of this many channels, or None."""
    if normalize not in NORMALIZATIONS:
        return f"unknown --normalize '{normalize}': choose one of {', '.join(NORMALIZATIONS)}"
    if normalize != "none" and len(NORMALIZATIONS[normalize][0]) != channels:
        return (f"--normalize {normalize} has {len(NORMALIZATIONS[normalize][0])} channels, the inputs have "
                f"{channels}: use --normalize none")
    return None


def set_normalization(model: nn.Module, normalize: str) -> None:
    """Sets the model's Normalize (model.normalize) to NORMALIZATIONS[normalize]; none keeps it the identity."""
    problem = normalization_problem(normalize, model.normalize.mean.shape[1])
    if problem:
        raise ValueError(problem)
    if normalize != "none":
        mean, std = NORMALIZATIONS[normalize]
        model.normalize.mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
        model.normalize.std.copy_(torch.tensor(std).view(1, -1, 1, 1))


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit the model (one-line message)."""


def _alias_pairs(model: nn.Module) -> dict[str, str]:
    """Maps each alias key (model_preact_hl1.*) to the key of the same tensor under its real name."""
    by_tensor: dict[int, str] = {}
    pairs = {}
    state = model.state_dict(keep_vars=True)
    for key, tensor in state.items():
        if not key.startswith("model_preact_hl1."):
            by_tensor.setdefault(id(tensor), key)
    for key, tensor in state.items():
        if key.startswith("model_preact_hl1."):
            pairs[key] = by_tensor[id(tensor)]
    return pairs


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Strictly loads a state_dict of the authors' code or of this repo.

    Accepts DataParallel's 'module.' prefix, the '0.' prefix of a model wrapped in nn.Sequential (ELLE's
    code saves its network so) and state_dicts without the alias keys (they are filled from the
    tensors they alias). Raises CheckpointError naming the missing, unexpected or mis-shaped keys.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if state and all(k.startswith("0.") for k in state):
        state = {k.removeprefix("0."): v for k, v in state.items()}
    for alias, original in _alias_pairs(model).items():
        if alias not in state and original in state:
            state[alias] = state[original]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                 for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_few(unexpected)}")
        if misshaped:
            parts.append(f"shapes differ (checkpoint vs model): {_few(misshaped)}")
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {'; '.join(parts)}; "
                              "check --model, --dataset, --n_filters_cnn and --n_layers")
    model.load_state_dict(state, strict=True)


def _few(items: list[str], k: int = 4) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" (+{len(items) - k} more)" if len(items) > k else "")


def read_checkpoint(path: str, which: str = "last") -> dict[str, torch.Tensor]:
    """The state_dict stored in a checkpoint file: {'last','best'} files (ours and the authors')
    give entry `which`; a bare state_dict holds one set of weights, read as 'last' ('best' is an
    error), as does the 'model' entry of ELLE's checkpoints ({'model': ..., 'epoch': ...}). Raises
    CheckpointError (one line) for an unreadable file, other pickled objects (never loaded: train.py's
    resume.pt is one) and weights holding NaN or inf."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check --model_path") from None
    except Exception as exc:  # noqa: BLE001 -- truncated, corrupt or not a torch file: any reader error
        if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
            raise CheckpointError(f"{path} holds Python objects besides tensors (train.py's resume.pt does), which "
                                  "are not loaded for safety; give a run's model.pth or a state_dict") from None
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours some of its messages
        first_line = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({first_line[:120]}); "
                              "is it a complete .pth file?") from None
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state_dict; expected {{'last','best'}} or a state_dict")
    if "last" in obj or "best" in obj:
        if which not in obj:
            raise CheckpointError(f"{path} has no '{which}' weights (it has {', '.join(sorted(obj))})")
        obj = obj[which]
    elif isinstance(obj.get("model"), dict) and which == "last":
        obj = obj["model"]
    elif which != "last":
        raise CheckpointError(f"{path} is a bare state_dict (one set of weights, no '{which}'); "
                              "evaluate it without --early_stopped_model")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a checkpoint: its entries are not tensors")
    nonfinite = [k for k, v in obj.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"the '{which}' weights in {path} hold NaN or inf ({_few(nonfinite)}): the run "
                              "diverged; evaluate other weights or retrain")
    return obj
