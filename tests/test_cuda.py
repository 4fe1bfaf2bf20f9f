"""The CUDA path: fp16 autocast + GradScaler, GradAlign's double backprop, the GPU-resident dataset.
Skipped on machines without CUDA (CI has none); run them where a GPU is available."""
from __future__ import annotations

import json
import os

import pytest
import torch

import models
import train
import utils
from tests.test_train import TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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
    reg16, g16 = reg_grad(utils.Autocast(model, "cuda"))
    assert torch.isfinite(g16).all() and abs(reg16 - reg32) < 0.05
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.9
