"""The CUDA path: fp16 autocast + GradScaler, GradAlign's double backprop, the GPU-resident dataset.
Marked cuda: skipped on machines without CUDA (CI has none); run them where a GPU is available."""
from __future__ import annotations

import json
import os

import pytest
import torch

import models
import precision
import train
import utils
from tests.fixtures import TINY

pytestmark = pytest.mark.cuda
CUDA = [a if a != "cpu" else "cuda" for a in TINY]


@pytest.mark.parametrize("extra", [
    ["--attack", "fgsm", "--attack_init", "zero", "--grad_align_cos_lambda", "1", "--half_prec"],
    ["--attack", "pgd", "--pgd_train_n_iters", "2", "--pgd_alpha_train", "38", "--grad_align_cos_lambda", "1",
     "--half_prec"],
    ["--attack", "fgsm", "--minibatch_replay", "2", "--half_prec", "--no-data_on_device"],
])
def test_training_on_cuda_writes_finite_results(tmp_path, extra):
    args = CUDA + ["--out_dir", str(tmp_path), *extra]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    run_dir = os.path.join(str(tmp_path), train.run_name(cfg, defaults))
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert 0 <= final["last"]["pgd_acc"] <= final["last"]["clean_acc"] <= 1
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["device_used"].startswith("cuda")


def test_fp16_gradalign_double_backprop_matches_fp32_direction():
    torch.manual_seed(0)
    model = models.build_model("resnet18", 10, (3, 32, 32)).cuda()
    x, y = torch.rand(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    eta = utils.uniform_delta(x, 8 / 255)

    def reg_grad(fwd):
        g1, _ = utils.input_grad(fwd, x, y, torch.zeros_like(x))
        g2, _ = utils.input_grad(fwd, x, y, eta, create_graph=True)
        reg = utils.grad_align_reg(g1, g2, 1.0)
        (grad,) = torch.autograd.grad(reg, [model.linear.weight])
        return reg.detach(), grad
    reg32, g32 = reg_grad(model)
    reg16, g16 = reg_grad(precision.Autocast(model, "cuda"))
    assert torch.isfinite(g16).all() and abs(reg16 - reg32) < 0.05
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.9


def test_fp16_gradalign_step_on_cuda_runs_batchnorm_in_fp32_and_skips_a_nan_step():
    torch.manual_seed(0)
    cfg, _ = train.parse_config(CUDA + ["--attack", "fgsm", "--attack_init", "zero", "--half_prec",
                                        "--grad_align_cos_lambda", "0.2", "--dataset", "cifar10",
                                        "--model", "resnet18"])
    device = torch.device("cuda")
    model = precision.to_device(models.build_model("resnet18", 10, (3, 32, 32)), device).train()
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
    opt = train.make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda")
    fwd = precision.forward_model(cfg, model, device, scaler)
    assert fwd.dtype == torch.float16 and fwd.norms
    x, y = torch.rand(32, 3, 32, 32, device=device), torch.randint(0, 10, (32,), device=device)
    st, stats = train.StepState(), train.Stats(device)
    train.train_step(fwd, opt, scaler, x, y, cfg, st, stats, update=True)
    assert seen and set(seen) == {torch.float32}
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    nan_loss = torch.nn.functional.cross_entropy(fwd(x), y) * float("nan")
    assert float(precision.optimizer_step(opt, scaler, nan_loss)) == 1.0  # skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
