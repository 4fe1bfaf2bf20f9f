"""The memory layout per pass (--channels_last, utils.LAYOUTS) and the evaluation loop's packed batch:
the choice is recorded, on/off/auto do what they say, a layout changes the robust accuracy by rounding
only, and the final evaluation's seeded results are those of a loop that gathers and scatters every step."""
from __future__ import annotations

import json
import os

import pytest
import torch

import models
import train
import utils
from tests.fixtures import TINY, trained_digits_cnn


def test_pass_layouts_on_off_auto():
    assert utils.pass_layouts("on", "cpu", "cnn") == {"train": True, "eval": True}
    assert utils.pass_layouts("off", "cuda", "resnet18") == {"train": False, "eval": False}
    for (device_type, model_name), table in utils.LAYOUTS.items():
        assert utils.pass_layouts("auto", device_type, model_name) == table
    assert utils.pass_layouts("auto", "cuda", "cnn") == {"train": True, "eval": True}
    assert utils.pass_layouts("auto", "cpu", "a_model_not_in_the_table") == {"train": False, "eval": False}
    with pytest.raises(ValueError, match="unknown layout choice"):
        utils.pass_layouts("yes", "cpu", "cnn")


def test_cpu_training_stays_contiguous_by_default():  # channels_last training would not repeat a run bit for bit
    assert not any(table["train"] for (device_type, _), table in utils.LAYOUTS.items() if device_type == "cpu")


def test_set_layout_and_input_layout():
    model = models.build_model("cnn", 10, (1, 8, 8), 2, 4)
    assert utils.input_layout(utils.set_layout(model, True)) == torch.channels_last
    assert utils.input_layout(utils.set_layout(model, False)) == torch.contiguous_format
    one_layer = utils.set_layout(models.build_model("cnn", 10, (1, 8, 8), 1, 4), True)
    assert utils.input_layout(one_layer) == torch.contiguous_format  # one input channel: both layouts coincide


def test_layout_copy_shares_the_scaler_and_leaves_the_model_alone():
    model = models.build_model("cnn", 10, (1, 8, 8), 2, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    wrapped = utils.Autocast(model, "cpu", torch.bfloat16, scaler=scaler)
    other = utils.layout_copy(wrapped, True)
    assert other.scaler is scaler and other.model is not model
    assert utils.input_layout(other) == torch.channels_last and utils.input_layout(wrapped) == torch.contiguous_format


@pytest.mark.parametrize("choice", ["on", "off", "auto"])
def test_the_layouts_used_are_recorded(tmp_path, choice):
    args = TINY + ["--out_dir", str(tmp_path / "runs"), "--attack", "fgsm", "--channels_last", choice,
                   "--n_layers", "2", "--n_filters_cnn", "4"]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    run_dir = os.path.join(tmp_path / "runs", train.run_name(cfg, defaults))
    assert "channels_last" not in os.path.basename(run_dir)  # speed and rounding only: not in the run name
    expected = utils.layout_names(utils.pass_layouts(choice, "cpu", "cnn"))
    config = json.load(open(os.path.join(run_dir, "config.json")))
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert config["channels_last"] == choice and config["layouts"] == expected
    assert final["eval_layout"] == expected["eval"]
    if choice == "on":
        assert expected == {"train": "channels_last", "eval": "channels_last"}
    if choice == "off":
        assert expected == {"train": "contiguous", "eval": "contiguous"}


def test_bad_layout_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(["--channels_last", "maybe"])
    assert exc.value.code == 2 and "--channels_last" in capsys.readouterr().err


def test_channels_last_evaluation_matches_contiguous_within_rounding():
    """A two-layer CNN (its second convolution has 8 input channels, so the layouts really differ) with
    random weights on random points labelled by its own predictions: every example is attacked. The robust
    accuracy may differ by at most one example per thousand (at least one example) between the layouts."""
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 2, 8).eval()
    x = torch.rand(400, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    batches = list(zip(x.split(200), y.split(200)))
    eps = 16 / 255
    results = {}
    for cl in (False, True):
        copy = utils.set_layout(models.build_model("cnn", 10, (1, 8, 8), 2, 8), cl).eval()
        copy.load_state_dict(model.state_dict())
        assert utils.input_layout(copy) == (torch.channels_last if cl else torch.contiguous_format)
        results[cl] = utils.seeded_robust_accuracy(copy, batches, eps, 10, 2, seed=0)
    n = results[False].n_eval
    assert results[False].clean_acc == results[True].clean_acc == 1.0
    assert 0.0 < results[False].pgd_acc < 1.0  # the attack breaks some examples, not all
    assert abs(results[False].pgd_acc - results[True].pgd_acc) * n <= max(1, n // 1000)


def gather_scatter_robust_accuracy(model, batches, eps, alpha, n_iters, n_restarts):
    """The final evaluation as it was written before the packed batch, restated: every step gathers the
    examples not yet fooled out of the restart's batch and scatters their new delta back."""
    n_clean = n_robust = n_total = passes = 0
    for x, y in batches:
        with torch.no_grad():
            robust = model(x).argmax(1) == y
        n_clean += int(robust.sum())
        for _ in range(n_restarts):
            start = utils.uniform_delta(x, eps)
            active = robust.nonzero().squeeze(1)
            if active.numel() == 0:
                continue
            xa, ya, delta = x[active], y[active], start[active]
            fooled = torch.zeros_like(ya, dtype=torch.bool)
            for step in range(n_iters):
                live = (~fooled).nonzero().squeeze(1)
                passes += live.numel()
                grad, logits = utils.input_grad(model, xa[live], ya[live], delta[live])
                if step > 0:
                    fooled[live] |= logits.argmax(1) != ya[live]
                new = torch.clamp(xa[live] + delta[live] + alpha * torch.sign(grad), 0.0, 1.0) - xa[live]
                delta[live] = torch.clamp(new, -eps, eps)
            with torch.no_grad():
                fooled |= model(xa + delta).argmax(1) != ya
            robust[active[fooled]] = False
        n_robust += int(robust.sum())
        n_total += len(y)
    return n_clean / n_total, n_robust / n_total, passes


@pytest.mark.parametrize("eps_255", [16, 48])
def test_packed_final_evaluation_matches_the_gather_scatter_loop(eps_255):
    model, x, y = trained_digits_cnn()
    batches = list(zip(x[1000:1400].split(128), y[1000:1400].split(128)))
    eps = eps_255 / 255
    ours = utils.seeded_robust_accuracy(model, batches, eps, 20, 3, seed=0)
    torch.manual_seed(0)
    clean, robust, passes = gather_scatter_robust_accuracy(model, batches, eps, utils.eval_alpha(eps), 20, 3)
    assert (ours.clean_acc, ours.pgd_acc, ours.grad_passes) == (clean, robust, passes)
    assert 0.0 < ours.pgd_acc < ours.clean_acc  # early exit happened, and some examples stayed robust


def test_in_place_projection_gives_the_out_of_place_values():
    torch.manual_seed(0)
    x, delta = torch.rand(64, 3, 8, 8), torch.randn(64, 3, 8, 8) * 0.1
    expected = torch.clamp(torch.clamp(x + delta, 0.0, 1.0) - x, -0.03, 0.03)
    assert torch.equal(utils.project(x, delta, 0.03), expected)


@pytest.mark.parametrize("half_prec", [False, True])
def test_periodic_evaluation_in_another_layout_than_training(tmp_path, monkeypatch, half_prec):
    """Training contiguous, evaluation channels_last (ResNet-18's CPU default, here on a small CNN): the
    periodic evaluation runs on a converted copy (through the Autocast wrapper under --half_prec) and
    leaves the training model's layout alone; the run's metrics equal a run with both passes contiguous
    up to the rounding of the evaluation layout."""
    monkeypatch.setitem(utils.LAYOUTS, ("cpu", "cnn"), {"train": False, "eval": True})
    args = (TINY + ["--attack", "fgsm", "--n_layers", "2", "--n_filters_cnn", "4"]
            + (["--half_prec"] if half_prec else []))
    runs = {}
    for choice in ("auto", "off"):
        out = str(tmp_path / choice)
        assert train.main(args + ["--out_dir", out, "--channels_last", choice]) == 0
        cfg, defaults = train.parse_config(args)
        run_dir = os.path.join(out, train.run_name(cfg, defaults))
        runs[choice] = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        layouts = json.load(open(os.path.join(run_dir, "config.json")))["layouts"]
        assert layouts == ({"train": "contiguous", "eval": "channels_last"} if choice == "auto"
                           else {"train": "contiguous", "eval": "contiguous"})
    for a, b in zip(runs["auto"], runs["off"]):
        assert a["train_loss"] == b["train_loss"]  # training is the same: its layout did not change
        assert abs(a["test_pgd_acc"] - b["test_pgd_acc"]) <= 1 / 64 + 1e-9
