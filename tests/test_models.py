"""Architectures, state_dict keys, initialisation and checkpoint loading (models.py)."""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return models.build_model("resnet18", 10, (3, 32, 32))


def _cnn(seed: int, n_filters: int = 4, n_layers: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return models.build_model("cnn", 10, (1, 8, 8), n_layers, n_filters)


# ---------------------------------------------------------------------------------- state_dict keys
def test_resnet18_state_dict_keys_and_shapes(resnet):
    sd = resnet.state_dict()
    assert len(sd) == 108
    for k in ("model_preact_hl1.1.weight", "model_preact_hl1.2.weight", "model_preact_hl1.2.bias",
              "model_preact_hl1.2.running_mean", "model_preact_hl1.2.running_var",
              "model_preact_hl1.2.num_batches_tracked"):
        assert k in sd, k
    assert sum(k.startswith("model_preact_hl1.") for k in sd) == 6
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
    assert sd["layer3.0.shortcut.0.weight"].shape == (256, 128, 1, 1)
    assert sd["layer4.0.conv1.weight"].shape == (512, 256, 3, 3)
    assert sd["linear.weight"].shape == (10, 512)
    assert sd["linear.bias"].shape == (10,)
    # the alias shares storage with the real layers
    assert sd["model_preact_hl1.1.weight"].data_ptr() == sd["conv1.weight"].data_ptr()
    assert sd["model_preact_hl1.2.running_var"].data_ptr() == sd["layer1.0.bn1.running_var"].data_ptr()
    # no shortcut in layer1 (64 -> 64, stride 1), nor in the second block of any layer
    assert not any(k.startswith("layer1.") and "shortcut" in k for k in sd)
    assert not any(".1.shortcut" in k for k in sd)
    # no bias in convolutions, no final BN (the last BN is layer4.1.bn2)
    assert not any("conv" in k and k.endswith(".bias") for k in sd)
    assert not any(k.startswith("bn") for k in sd)
    # the Normalize tensors are not in the state_dict
    assert not any("normalize" in k or k.endswith((".mean", ".std")) for k in sd)


def test_cnn_state_dict_keys():
    sd = _cnn(0, 4, 1).state_dict()
    assert set(sd) == {"_model.0.weight", "_model.0.bias", "_model.3.weight", "_model.3.bias",
                       "model_preact_hl1.0.weight", "model_preact_hl1.0.bias"}
    assert sd["_model.0.weight"].shape == (4, 1, 3, 3)
    assert sd["_model.3.weight"].shape == (10, 4 * 8 * 8)
    sd2 = _cnn(0, 4, 2).state_dict()
    assert set(sd2) == {"_model.0.weight", "_model.0.bias", "_model.2.weight", "_model.2.bias",
                        "_model.5.weight", "_model.5.bias", "model_preact_hl1.0.weight",
                        "model_preact_hl1.0.bias"}
    assert sd2["_model.2.weight"].shape == (4, 4, 3, 3)
    assert sd2["_model.5.weight"].shape == (10, 4 * 8 * 8)


def test_cnn_bn_state_dict_keys_and_batchnorm():
    torch.manual_seed(0)
    model = models.build_model("cnn_bn", 10, (1, 8, 8), 2, 4)
    sd = model.state_dict()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert set(sd) == ({"_model.0.weight", "_model.3.weight", "_model.7.weight", "_model.7.bias"}
                       | {f"_model.{i}.{k}" for i in (1, 4) for k in bn})  # no conv bias, no alias
    assert sd["_model.3.weight"].shape == (4, 4, 3, 3)
    assert sd["_model.7.weight"].shape == (10, 4 * 8 * 8)
    assert model.first_layer_filters().shape == (4, 1, 3, 3)
    # BatchNorm in train mode: each channel after the first conv is centred on the batch
    x = torch.rand(16, 1, 8, 8)
    pre = model._model[:2](x)
    assert pre.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert model(x).shape == (16, 10)
    model.eval()
    assert not torch.allclose(model._model[:2](x).mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-3)


def test_unknown_model_name_raises():
    with pytest.raises(ValueError):
        models.build_model("lenet", 10, (3, 32, 32))


def test_preact_block_shortcut_takes_block_input():
    torch.manual_seed(1)
    block = models.PreActBlock(4, 8, stride=2).eval()
    for bn in (block.bn1, block.bn2):  # non-trivial BN so relu(bn1(x)) differs from x
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = block(x)
        pre = F.relu(block.bn1(x))
        main = block.conv2(F.relu(block.bn2(block.conv1(pre))))
        expected = main + block.shortcut(x)
        other = main + block.shortcut(pre)
    assert out.shape == (2, 8, 4, 4)
    assert torch.allclose(out, expected, atol=1e-5)
    assert not torch.allclose(out, other, atol=1e-3)


def test_wrn28_10_keys_shapes_and_size():
    model = models.build_model("wrn28_10", 100, (3, 32, 32))
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 36_479_194 + 90 * 641  # 36.5M at 10 classes
    assert len(state) == 155  # 12 blocks x 12 keys, 3 shortcut convs, conv1, bn1 (5 keys), fc (2)
    assert state["conv1.weight"].shape == (16, 3, 3, 3) and state["fc.weight"].shape == (100, 640)
    for group, (planes, blocks) in enumerate([(160, 4), (320, 4), (640, 4)], start=1):
        for i in range(blocks):
            assert state[f"block{group}.layer.{i}.conv2.weight"].shape == (planes, planes, 3, 3)
        assert f"block{group}.layer.0.convShortcut.weight" in state
        assert f"block{group}.layer.1.convShortcut.weight" not in state
    assert state["block2.layer.0.conv1.weight"].shape == (320, 160, 3, 3)
    small = models.WideResNet(7, depth=16, width=2)  # depth and width are arguments: 2 blocks, widths 32-128
    assert len(small.block1.layer) == 2 and small.fc.weight.shape == (7, 128)
    with pytest.raises(ValueError, match="depth 6n"):
        models.WideResNet(10, depth=27)


def test_wide_block_shortcut_is_the_preactivated_input_when_the_width_changes():
    torch.manual_seed(2)
    for in_planes, planes, stride in ((4, 8, 2), (8, 8, 1)):
        block = models.WideBlock(in_planes, planes, stride).eval()
        for bn in (block.bn1, block.bn2):
            bn.running_mean.normal_()
            bn.weight.data.normal_()
            bn.bias.data.normal_()
        x = torch.randn(2, in_planes, 8, 8)
        with torch.no_grad():
            pre = F.relu(block.bn1(x))
            main = block.conv2(F.relu(block.bn2(block.conv1(pre))))
            shortcut = block.convShortcut(pre) if in_planes != planes else x
            assert torch.allclose(block(x), main + shortcut, atol=1e-5)
            assert not torch.allclose(block(x), main + (pre if in_planes == planes else block.convShortcut(x)),
                                      atol=1e-3)


@pytest.mark.parametrize("side", [28, 29, 32, 60, 61])
def test_wrn_input_sides_are_what_check_model_input_accepts(side):
    import data
    model = models.WideResNet(10, depth=10, width=1).eval()  # the sides depend on the strides only
    accepted = True
    try:
        data.check_model_input("wrn28_10", (3, side, side))
    except ValueError:
        accepted = False
    try:
        with torch.no_grad():
            works = model(torch.rand(2, 3, side, side)).shape == (2, 10)
    except RuntimeError:
        works = False
    assert works == accepted == (29 <= side <= 60)


# ----------------------------------------------------------------------------------- checkpoints
def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_reference_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(2)
    x = torch.rand(5, 1, 8, 8)
    src_last, src_best = _cnn(11), _cnn(12)
    path = tmp_path / "ref.pth"
    torch.save({"last": src_last.state_dict(), "best": src_best.state_dict()}, path)
    for which, src in (("last", src_last), ("best", src_best)):
        fresh = _cnn(99)
        assert not torch.allclose(_outputs(fresh, x), _outputs(src, x))
        models.load_state(fresh, models.read_checkpoint(str(path), which))
        assert torch.equal(_outputs(fresh, x), _outputs(src, x))
    # default is 'last'
    fresh = _cnn(99)
    models.load_state(fresh, models.read_checkpoint(str(path)))
    assert torch.equal(_outputs(fresh, x), _outputs(src_last, x))


def test_bare_state_dict_file_loads(tmp_path):
    torch.manual_seed(3)
    x = torch.rand(3, 1, 8, 8)
    src = _cnn(13)
    path = tmp_path / "bare.pth"
    torch.save(src.state_dict(), path)
    fresh = _cnn(98)
    models.load_state(fresh, models.read_checkpoint(str(path), "last"))
    assert torch.equal(_outputs(fresh, x), _outputs(src, x))
    with pytest.raises(models.CheckpointError, match="bare state_dict.*without --early_stopped_model"):
        models.read_checkpoint(str(path), "best")  # one set of weights: not labelled 'best'


def test_state_dict_without_alias_keys_loads():
    torch.manual_seed(4)
    x = torch.rand(3, 1, 8, 8)
    src = _cnn(14)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("model_preact_hl1.")}
    assert len(sd) == 4
    fresh = _cnn(97)
    models.load_state(fresh, sd)
    assert torch.equal(_outputs(fresh, x), _outputs(src, x))


def test_resnet_without_alias_keys_and_module_prefix_loads():
    torch.manual_seed(5)
    x = torch.rand(2, 3, 32, 32)
    src = models.build_model("resnet18", 10, (3, 32, 32))
    src.train()
    with torch.no_grad():
        src(torch.rand(2, 3, 32, 32))  # move the BN running stats away from their init
    assert src.layer1[0].bn1.num_batches_tracked.item() >= 1
    sd = {"module." + k: v.clone() for k, v in src.state_dict().items() if not k.startswith("model_preact_hl1.")}
    assert len(sd) == 102
    torch.manual_seed(6)
    fresh = models.build_model("resnet18", 10, (3, 32, 32))
    assert not torch.allclose(_outputs(fresh, x), _outputs(src, x))
    models.load_state(fresh, sd)
    assert torch.equal(_outputs(fresh, x), _outputs(src, x))
    assert torch.equal(fresh.model_preact_hl1[2].running_mean, src.layer1[0].bn1.running_mean)


def test_module_prefixed_cnn_keys_load():
    torch.manual_seed(7)
    x = torch.rand(3, 1, 8, 8)
    src = _cnn(15)
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    fresh = _cnn(96)
    models.load_state(fresh, sd)
    assert torch.equal(_outputs(fresh, x), _outputs(src, x))


def test_load_state_rejects_other_architecture(resnet):
    torch.manual_seed(8)
    with pytest.raises(models.CheckpointError) as info:
        models.load_state(resnet, _cnn(16).state_dict())
    msg = str(info.value)
    assert "missing keys" in msg and "conv1.weight" in msg
    assert "unexpected keys" in msg and "_model.0.weight" in msg


def test_load_state_rejects_other_width():
    torch.manual_seed(9)
    model = _cnn(17, n_filters=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(models.CheckpointError) as info:
        models.load_state(model, _cnn(18, n_filters=8).state_dict())
    msg = str(info.value)
    assert "_model.0.weight (8, 1, 3, 3) vs (4, 1, 3, 3)" in msg
    assert "_model.3.weight (10, 512) vs (10, 256)" in msg
    assert "\n" not in msg
    # nothing was half-loaded
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # another depth: missing / unexpected keys
    with pytest.raises(models.CheckpointError, match="_model.5.weight"):
        models.load_state(model, _cnn(19, n_layers=2).state_dict())


def test_read_checkpoint_errors(tmp_path):
    torch.manual_seed(10)
    good = tmp_path / "good.pth"
    torch.save({"last": _cnn(20, n_filters=16).state_dict(), "best": _cnn(21, n_filters=16).state_dict()}, good)
    data = good.read_bytes()
    assert len(data) > 4000
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).tolist()))
    as_json = tmp_path / "ckpt.json"
    as_json.write_text(json.dumps({"last": {"w": [1, 2, 3]}, "best": {}}))
    missing = tmp_path / "does_not_exist.pth"
    for path in (truncated, noise, as_json, missing):
        with pytest.raises(models.CheckpointError) as info:
            models.read_checkpoint(str(path), "last")
        assert str(path) in str(info.value)
    only_last = tmp_path / "only_last.pth"
    torch.save({"last": _cnn(22).state_dict()}, only_last)
    assert set(models.read_checkpoint(str(only_last), "last")) == set(_cnn(22).state_dict())
    with pytest.raises(models.CheckpointError, match="best"):
        models.read_checkpoint(str(only_last), "best")
    # the complete file reads fine (the failures above come from the damage, not the format)
    assert set(models.read_checkpoint(str(good), "best")) == set(_cnn(0, n_filters=16).state_dict())


def test_read_checkpoint_rejects_non_state_dicts(tmp_path):
    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"last": {"a": 1}, "best": {"a": 2}}, not_tensors)
    a_tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), a_tensor)
    for path in (empty, not_tensors, a_tensor):
        with pytest.raises(models.CheckpointError):
            models.read_checkpoint(str(path), "last")


# ------------------------------------------------------------------------------------ initialisation
def test_resnet18_init():
    torch.manual_seed(11)
    model = models.build_model("resnet18", 10, (3, 32, 32))
    n_bn = 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n_bn += 1
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert n_bn == 16  # 2 per block, 8 blocks (modules() visits the aliased layer1[0].bn1 once)
    for name in ("layer4.0.conv2", "layer3.1.conv1", "layer4.0.shortcut.0"):
        w = model.get_submodule(name).weight.detach()
        k, out_ch = w.shape[2], w.shape[0]
        target = math.sqrt(2.0 / (k * k * out_ch))
        assert abs(float(w.std()) / target - 1) < 0.05, name
        assert abs(float(w.mean())) < 0.05 * target, name
    lin = model.linear.requires_grad_(False)
    assert torch.all(lin.bias == 0)
    assert abs(float(lin.weight.std()) / math.sqrt(2.0 / 512) - 1) < 0.05
    # not PyTorch's default init (kaiming-uniform with a=sqrt(5): std = 1/sqrt(3*fan_in))
    default_std = 1 / math.sqrt(3 * 512 * 9)
    assert float(model.layer4[0].conv2.weight.detach().std()) > 1.5 * default_std


def test_cnn_init():
    model = _cnn(12, n_filters=64).requires_grad_(False)
    conv, lin = model._model[0], model._model[3]
    assert torch.all(conv.bias == 0) and torch.all(lin.bias == 0)
    assert abs(float(conv.weight.std()) / math.sqrt(2.0 / (9 * 64)) - 1) < 0.1
    assert abs(float(lin.weight.std()) / math.sqrt(2.0 / (64 * 64)) - 1) < 0.05


def test_init_visits_the_alias_again_last():
    # The authors' init: model.apply reaches the first conv twice (through _model and the alias), the second time
    # after the linear layer, so the conv's final weights are the THIRD normal draw after construction.
    torch.manual_seed(24)
    models.CNN(10, (1, 8, 8), 1, 4)  # construction consumes the same random numbers as in build_model
    first_conv = torch.empty(4, 1, 3, 3).normal_(0, math.sqrt(2.0 / (9 * 4)))
    linear = torch.empty(10, 256).normal_(0, math.sqrt(2.0 / 256))
    second_conv = torch.empty(4, 1, 3, 3).normal_(0, math.sqrt(2.0 / (9 * 4)))
    torch.manual_seed(24)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    assert torch.equal(model._model[3].weight.detach(), linear)
    assert torch.equal(model._model[0].weight.detach(), second_conv)
    assert not torch.equal(second_conv, first_conv)


# ------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("side", [25, 32, 56])
def test_resnet18_input_sides(resnet, side):
    torch.manual_seed(13)
    resnet.eval()
    with torch.no_grad():
        out = resnet(torch.rand(2, 3, side, side))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_resnet18_binary_head_and_batch_independence():
    torch.manual_seed(14)
    model = models.build_model("resnet18", 2, (3, 32, 32)).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        full, single = model(x), model(x[1:2])
    assert full.shape == (3, 2)
    assert torch.allclose(full[1:2], single, atol=1e-5)


def test_cnn_forward_shapes():
    torch.manual_seed(15)
    model = models.build_model("cnn", 2, (3, 32, 32), 1, 4)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    assert models.build_model("cnn", 10, (1, 8, 8), 2, 4)(torch.rand(5, 1, 8, 8)).shape == (5, 10)
    assert model.first_layer_filters().shape == (4, 3, 3, 3)


# ------------------------------------------------------------------------------------ no host sync
def test_forward_methods_have_no_host_sync_in_source():
    for cls in (models.Normalize, models.PreActBlock, models.PreActResNet18, models.CNN, models.CNNBN,
                models.WideBlock, models.WideGroup, models.WideResNet):
        src = inspect.getsource(cls.forward)
        for bad in (".item(", ".cpu(", "numpy", ".tolist("):
            assert bad not in src, (cls.__name__, bad)


def test_forward_has_no_host_sync_under_profiler(resnet):
    # .item(), bool(), float() and .tolist() on a tensor all record aten::_local_scalar_dense.
    torch.manual_seed(16)
    x = torch.rand(1, 3, 32, 32)
    cnn = _cnn(23)
    was_training = resnet.training
    try:
        for model, inp in ((resnet.eval(), x), (resnet.train(), x), (cnn, torch.rand(2, 1, 8, 8))):
            with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                model(inp)
            names = {e.name for e in prof.events()}
            assert any("conv" in n for n in names)  # the profiler recorded the forward
            assert "aten::_local_scalar_dense" not in names and "aten::item" not in names
        # control: the check does see a host sync
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            float(cnn(torch.rand(1, 1, 8, 8)).sum())
        assert "aten::_local_scalar_dense" in {e.name for e in prof.events()}
    finally:
        resnet.train(was_training)
