"""The details of the authors' training loop that move results (docs/fidelity.md)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import methods
import models
import train
import utils
from tests.fixtures import TINY, read_metrics, run_train, write_cifar10


# ---------------------------------------------------------------------------------- BatchNorm stats
@pytest.mark.parametrize("flags, forwards", [
    (["--attack", "fgsm"], 2),
    (["--attack", "fgsm", "--grad_align_cos_lambda", "0.2"], 3),
    (["--attack", "pgd", "--pgd_train_n_iters", "2"], 2 + 2),
    (["--attack", "none"], 2),
    (["--attack", "fgsm", "--minibatch_replay", "2"], 2),
])
def test_batchnorm_running_stats_are_updated_by_exactly_the_reference_forwards(tmp_path, flags, forwards):
    write_cifar10(tmp_path / "data", [[1, 2], [3, 4], [], [], []], [5, 6])  # 4 images: batch 2 -> 2 iterations/epoch
    args = ["--dataset", "cifar10", "--model", "resnet18", "--data_dir", str(tmp_path / "data"), "--epochs", "1",
            "--batch_size", "2", "--n_eval_every_k_iter", "2", "--batch_size_eval", "2", "--attack_iters", "1",
            "--n_final_eval", "2", "--device", "cpu", "--debug", "--out_dir", str(tmp_path / "runs"), *flags]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    ckpt = torch.load(os.path.join(tmp_path / "runs", train.run_name(cfg, defaults), "model.pth"),
                      weights_only=True)
    n_iterations = 2 + 1  # one epoch of 2 iterations, plus epoch 0
    for key in ("layer1.0.bn1.num_batches_tracked", "layer4.1.bn2.num_batches_tracked"):
        assert int(ckpt["last"][key]) == n_iterations * forwards, key


# ------------------------------------------------------------------------------------------ epoch 0
def test_epoch_zero_changes_no_parameter(tmp_path):
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--grad_align_cos_lambda", "1", "--epochs", "0")
    torch.manual_seed(0)
    fresh = models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()
    last = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)["last"]
    for key, value in fresh.items():
        assert torch.equal(last[key], value), key
    assert [r["iteration"] for r in read_metrics(run_dir)] == [0]


# ------------------------------------------------------------------------------------------- Free-AT
def _cfg(*extra: str) -> train.Config:
    return train.parse_config(TINY + list(extra))[0]


def _tiny_batch():
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    x = torch.rand(6, 1, 8, 8)
    x[:, :, 0, :] = 0.0  # exact box boundaries
    x[:, :, -1, :] = 1.0
    return model, x, torch.randint(0, 10, (6,))


def test_free_at_first_delta_is_the_fgsm_step_from_zero_and_weights_see_the_updated_delta():
    model, x, y = _tiny_batch()
    cfg = _cfg("--attack", "fgsm", "--minibatch_replay", "4", "--fgsm_alpha", "1.0", "--attack_init", "random",
               "--weight_decay", "0")
    eps = cfg.eps_frac
    x_req = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(utils.box_clamp(x + x_req, "half")), y)
    (g,) = torch.autograd.grad(loss, x_req)
    expected_delta = torch.clamp(x + eps * torch.sign(g), 0, 1) - x

    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    st = train.StepState()
    train.train_step(model, opt, scaler, x, y, cfg, st, train.Stats(torch.device("cpu")), update=True)
    assert torch.allclose(st.states["free_delta"], expected_delta, atol=1e-7)  # zero start, although init=random

    hand = F.cross_entropy(reference(x + expected_delta), y)
    hand.backward()
    for p_hand, p in zip(reference.parameters(), model.parameters()):
        assert torch.allclose(p.grad, p_hand.grad, atol=1e-6)


def test_free_at_draws_a_new_batch_every_m_iterations(tmp_path, monkeypatch):
    seen = []
    original = train.train_step

    def spy(model, opt, scaler, x, y, cfg, st, stats, update):
        seen.append(hash(x.numpy().tobytes()))
        return original(model, opt, scaler, x, y, cfg, st, stats, update)
    monkeypatch.setattr(train, "train_step", spy)
    # batch 200 -> 7 iterations per epoch; m = 3 -> batches at i = 0, 3, 6: ceil(7/3) = 3 distinct
    run_train(tmp_path, "--attack", "fgsm", "--minibatch_replay", "3", "--batch_size", "200",
              "--n_eval_every_k_iter", "200", "--eval_iter_freq", "100")
    epoch1 = seen[1:]
    assert len(epoch1) == 7
    assert len(set(epoch1)) == 3
    assert epoch1[0] == epoch1[1] == epoch1[2] and epoch1[3] == epoch1[4] == epoch1[5] != epoch1[6]


# ------------------------------------------------------------------------------------- SVHN warm-up
def test_svhn_warmup_factor():
    cfg = train.parse_config(["--dataset", "svhn"])[0]
    assert [train.warmup_factor(cfg, i) for i in (0, 1, 2861, 5000)] == [0.0, 1 / 2861, 1.0, 1.0]
    assert train.warmup_factor(train.parse_config([])[0], 0) == 1.0  # cifar10: none


def test_svhn_warmup_scales_the_fgsm_step_only():
    model, x, y = _tiny_batch()
    cfg = _cfg("--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1.0")
    half = methods.perturb_fgsm(model, x, y, cfg, train.StepState(warm=0.5)).delta
    full = methods.perturb_fgsm(model, x, y, cfg, train.StepState(warm=1.0)).delta
    unclipped = full.abs() > cfg.eps_frac - 1e-6  # the box did not cut the full step there
    assert unclipped.sum() > 10
    assert torch.allclose(half[unclipped], 0.5 * full[unclipped], atol=1e-6)


# ------------------------------------------------------------------------------- GradAlign with PGD
def test_gradalign_with_pgd_backpropagates_through_grad1():
    model, x, y = _tiny_batch()
    cfg = _cfg("--attack", "pgd", "--attack_init", "zero", "--grad_align_cos_lambda", "1", "--weight_decay", "0",
               "--pgd_train_n_iters", "1")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    torch.manual_seed(1)
    train.train_step(model, opt, scaler, x, y, cfg, train.StepState(), train.Stats(torch.device("cpu")),
                     update=True)
    step_grads = [p.grad.clone() for p in model.parameters()]

    def param_grads(detach_grad1: bool):
        torch.manual_seed(1)
        delta = utils.pgd_attack(model, x, y, cfg.eps_frac, cfg.pgd_alpha_train_frac, 1, random_start=False,
                                 clamp_rule="half")
        grad1, _ = utils.input_grad(model, x, y, torch.zeros_like(x), create_graph=not detach_grad1)
        loss = F.cross_entropy(model(x + delta), y)
        grad2, _ = utils.input_grad(model, x, y, utils.uniform_delta(x, cfg.eps_frac), create_graph=True)
        total = loss + utils.grad_align_reg(grad1.detach() if detach_grad1 else grad1, grad2, 1.0)
        return torch.autograd.grad(total, list(model.parameters()))
    with_graph, detached = param_grads(False), param_grads(True)
    for g_step, g_graph in zip(step_grads, with_graph):
        assert torch.allclose(g_step, g_graph, atol=1e-6)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(with_graph, detached))


# --------------------------------------------------------------------------- evaluation and 'best'
def test_periodic_evaluation_fires_after_the_step_on_the_global_counter(tmp_path):
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--epochs", "2", "--eval_iter_freq", "3")
    rows = read_metrics(run_dir)
    assert [(r["epoch"], r["iteration"]) for r in rows] == [(0, 0), (1, 3), (2, 6)]
    assert rows[0]["lr"] == 0.0  # epoch 0: t <= 0, and no optimiser step


def test_best_is_the_untrained_model_when_training_pgd_accuracy_stays_zero(tmp_path, monkeypatch):
    original = utils.periodic_metrics

    def zero_train_pgd(*args, **kwargs):
        return {**original(*args, **kwargs), "train_pgd_acc": 0.0}
    monkeypatch.setattr(utils, "periodic_metrics", zero_train_pgd)
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--epochs", "2")
    torch.manual_seed(0)
    fresh = models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()
    ckpt = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)
    assert all(torch.equal(ckpt["best"][k], v) for k, v in fresh.items())
    assert not all(torch.equal(ckpt["last"][k], v) for k, v in fresh.items())


def test_best_is_replaced_only_on_strictly_higher_accuracy(tmp_path, monkeypatch):
    scores = iter([0.5, 0.5, 0.25, 0.75, 0.75])  # evaluations at iterations 0, 2, 4, 6, 8
    snapshots = []
    original = train.periodic_evaluation

    def scripted(model, fwd_model, loaders, cfg):
        snapshots.append(copy.deepcopy(model.state_dict()))
        return {**original(model, fwd_model, loaders, cfg), "train_pgd_acc": next(scores)}
    monkeypatch.setattr(train, "periodic_evaluation", scripted)
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--epochs", "2")
    best = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)["best"]
    assert len(snapshots) == 5
    assert all(torch.equal(best[k], v) for k, v in snapshots[3].items())  # first 0.75, not the tie after it
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert final["best_train_pgd_acc"] == 0.75
