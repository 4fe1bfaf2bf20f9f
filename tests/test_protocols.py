"""The two protocols (this paper's, and each later method's own paper's: --protocol own), the settings
they resolve to, the flags they add (--lr_peak, --normalize, --clean_forward), the refusals, the
recipes per dataset and model, the CIFAR-10 sweep's PROTOCOL=own and report.py's rows for both."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess

import numpy as np
import pytest
import torch
from fixtures import ROOT, TINY

import config
import eval as evaluation
import methods
import models
import report
import rundir
import train
import utils

# What each later method's official script sets beyond its flags on CIFAR-10, restated from the
# scripts: the cyclic schedule peaks at mid-training (up and down steps of half the iterations each, or
# epochs // 2), no mixed precision, and N-FGSM and ZeroGrad normalise the inputs by the CIFAR-10 mean
# and std; ELLE's loss ends with a clean forward at x in train mode, whose output is only logged.
OWN_CIFAR10 = {
    "nfgsm": {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar10"},
    "zerograd": {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar10"},
    "elle": {"protocol": "own", "lr_peak": 0.5, "clean_forward": True},
    "elle_a": {"protocol": "own", "lr_peak": 0.5, "clean_forward": True},
}
# On SVHN their scripts peak at 2/5, as this paper; N-FGSM normalises by its SVHN statistics, ZeroGrad
# by mean 0.5 and std 0.5. On CIFAR-100, N-FGSM and ZeroGrad use the CIFAR-100 statistics.
OWN_OTHER = {
    ("nfgsm", "svhn"): {"protocol": "own", "normalize": "svhn"},
    ("zerograd", "svhn"): {"protocol": "own", "normalize": "half"},
    ("elle_a", "svhn"): {"protocol": "own", "clean_forward": True},
    ("nfgsm", "cifar100"): {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar100"},
    ("zerograd", "cifar100"): {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar100"},
}
PAPER_RECIPES = methods.recipes().keys() - OWN_CIFAR10.keys() - {"gradalign_fd"}


def resolved(argv: list[str]) -> tuple[dict, str, dict]:
    """(every resolved setting, the run name, config.json's settings) of train.py's flags."""
    cfg, defaults = config.parse_config(argv)
    return dataclasses.asdict(cfg), rundir.run_name(cfg, defaults), config.record(cfg)


def changed(a: dict, b: dict) -> dict:
    return {k: b[k] for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


# ------------------------------------------------------------------------------ what own changes
@pytest.mark.parametrize("recipe", sorted(OWN_CIFAR10))
def test_own_protocol_changes_exactly_its_papers_settings_on_cifar10(recipe):
    flags = methods.flags(recipe, 8, "cifar10")
    paper, paper_name, paper_record = resolved(flags)
    own, own_name, own_record = resolved(flags + ["--protocol", "own"])
    assert changed(paper, own) == OWN_CIFAR10[recipe]
    assert changed(paper_record, own_record) == OWN_CIFAR10[recipe]  # config.json records them
    assert own_name == paper_name.replace("_seed0", "_protoown_seed0")  # the rest comes with the protocol
    assert own["half_prec"] is False


@pytest.mark.parametrize("recipe, dataset", sorted(OWN_OTHER))
def test_own_protocol_per_dataset(recipe, dataset):
    flags = methods.flags(recipe, 8, dataset)
    paper, _, _ = resolved(flags + ["--dataset", dataset])
    own, _, _ = resolved(flags + ["--dataset", dataset, "--protocol", "own"])
    assert changed(paper, own) == OWN_OTHER[recipe, dataset]


@pytest.mark.parametrize("recipe", sorted(PAPER_RECIPES))
def test_own_protocol_is_the_paper_protocol_for_the_papers_methods(recipe):
    flags = methods.flags(recipe, 8, "cifar10") + ["--half_prec"]
    assert resolved(flags + ["--protocol", "own"]) == resolved(flags)  # same settings, name, config.json


def test_paper_protocol_names_and_records_are_those_of_before():
    for recipe in methods.recipes():
        if recipe == "gradalign_fd":
            continue
        flags = methods.flags(recipe, 8, "cifar10")
        settings, name, record = resolved(flags)
        assert resolved(flags + ["--protocol", "paper", "--lr_peak", "0.4", "--normalize", "none",
                                 "--no-clean_forward"]) == (settings, name, record)
        assert not {"protocol", "lr_peak", "normalize", "clean_forward"} & record.keys()
        assert not any(part.startswith(("proto", "peak", "norm", "cleanfwd")) for part in name.split("_"))
    _, name, _ = resolved(["--attack=nfgsm", "--fgsm_alpha=1.0", "--nfgsm_noise_mult=2", "--epochs=30",
                           "--lr_max=0.2", "--eps=8", "--half_prec", "--seed=0"])
    assert name == "cifar10_resnet18_nfgsm_random_eps8_lam0_hp_seed0"


def test_a_setting_given_explicitly_wins_over_the_protocol_and_is_named():
    flags = methods.flags("nfgsm", 8, "cifar10") + ["--protocol", "own"]
    own, name, _ = resolved(flags + ["--lr_peak", "0.4", "--normalize", "none"])
    assert (own["lr_peak"], own["normalize"], own["protocol"]) == (0.4, "none", "own")
    assert "_peak0.4_normnone_protoown_" in name


def test_report_names_a_run_the_way_train_names_it_under_both_protocols():
    for extra in ([], ["--protocol", "own"], ["--protocol", "own", "--lr_peak", "0.3"]):
        cfg, defaults = config.parse_config(methods.flags("elle_a", 8, "cifar10") + extra)
        assert report.expected_run_name(config.record(cfg)) == rundir.run_name(cfg, defaults)


# --------------------------------------------------------------------------------------- refusals
def test_own_protocol_of_a_later_method_refuses_half_precision(cli, tmp_path):
    result = cli("train.py", *TINY, "--attack", "nfgsm", "--protocol", "own", "--half_prec", "--out_dir", tmp_path)
    assert result.code == 2 and result.err.count("\n") == 1 and "drop --half_prec" in result.err
    assert os.listdir(tmp_path) == []


def test_finite_difference_gradalign_is_refused_in_half_precision(cli, tmp_path):
    result = cli("train.py", *TINY, "--grad_align_cos_lambda", "1", "--grad_align_fd", "0.001", "--half_prec",
                 "--out_dir", tmp_path)
    assert result.code == 2 and result.err.count("\n") == 1 and "--grad_align_fd needs fp32" in result.err
    assert os.listdir(tmp_path) == []
    cfg = config.parse_config(TINY + ["--grad_align_cos_lambda", "1", "--grad_align_fd", "0.001"])[0]
    assert cfg.half_prec is False


@pytest.mark.parametrize("flags, fragment", [
    (["--lr_peak", "0"], "--lr_peak must be in (0, 1]"),
    (["--lr_peak", "1.5"], "--lr_peak must be in (0, 1]"),
    (["--lr_peak", "0.5", "--lr_schedule", "piecewise"], "--lr_peak needs --lr_schedule cyclic"),
    (["--normalize", "cifar10"], "--normalize cifar10 has 3 channels, the inputs have 1"),
])
def test_bad_protocol_settings_are_one_line_exit_2(capsys, flags, fragment):
    with pytest.raises(SystemExit) as exc:
        config.parse_config(TINY + flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and fragment in err[0], err


# -------------------------------------------------------------------------------------- schedule
def test_lr_peak_default_is_the_papers_floor_of_two_fifths():
    for epochs in range(1, 61):
        top = epochs * 2 // 5
        for t in np.linspace(0, epochs, 37):
            expected = float(np.interp(t, [0, top, epochs], [0, 0.2, 0]))
            assert utils.lr_at(t, "cyclic", 0.2, epochs) == expected
            assert utils.lr_at(t, "cyclic", 0.2, epochs, 0.4) == expected


def test_lr_peak_half_peaks_at_mid_training():
    for epochs in (2, 10, 30):
        assert utils.lr_at(epochs / 2, "cyclic", 0.2, epochs, 0.5) == pytest.approx(0.2)
        assert utils.lr_at(epochs / 2 - 0.25, "cyclic", 0.2, epochs, 0.5) < 0.2
        assert utils.lr_at(epochs / 2 + 0.25, "cyclic", 0.2, epochs, 0.5) < 0.2
    assert utils.lr_at(7, "cyclic", 1.0, 15, 0.5) == 1.0  # floor(7.5): ZeroGrad's epochs // 2


# --------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("name, channels, size", [("resnet18", 3, 32), ("cnn", 3, 8), ("cnn_bn", 3, 8)])
def test_normalize_equals_the_plain_model_on_normalised_input(name, channels, size):
    torch.manual_seed(0)
    plain = models.build_model(name, 10, (channels, size, size), 1, 4).eval()
    torch.manual_seed(0)
    normed = models.build_model(name, 10, (channels, size, size), 1, 4, normalize="cifar10").eval()
    assert list(normed.state_dict()) == list(plain.state_dict())
    x = torch.rand(4, channels, size, size)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in models.NORMALIZATIONS["cifar10"])
    torch.testing.assert_close(normed(x), plain((x - mean) / std), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(normed(x), plain(x), atol=1e-3)


def test_normalize_on_a_wide_resnet_keeps_its_keys():
    torch.manual_seed(0)
    plain = models.WideResNet(10, depth=10, width=1).eval()
    torch.manual_seed(0)
    normed = models.WideResNet(10, depth=10, width=1).eval()
    models.set_normalization(normed, "svhn")
    assert list(normed.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in models.NORMALIZATIONS["svhn"])
    torch.testing.assert_close(normed(x), plain((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_an_authors_state_dict_loads_into_a_normalised_model():
    source = models.build_model("resnet18", 10, (3, 32, 32))
    target = models.build_model("resnet18", 10, (3, 32, 32), normalize="cifar10")
    models.load_state(target, source.state_dict())
    assert torch.equal(target.normalize.std, torch.tensor(models.NORMALIZATIONS["cifar10"][1]).view(1, -1, 1, 1))


def test_eval_reads_the_normalisation_from_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "cifar10", "model": "resnet18",
                                                      "normalize": "cifar10", "eps": 8}))
    args = evaluation.fill_from_run(evaluation.build_parser().parse_args(["--model_path", "x"]),
                                    str(tmp_path / "model.pth"))
    assert args.normalize == "cifar10"
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "cifar10", "model": "resnet18", "eps": 8}))
    args = evaluation.fill_from_run(evaluation.build_parser().parse_args(["--model_path", "x"]),
                                    str(tmp_path / "model.pth"))
    assert args.normalize == "none"  # runs before the flag, and this paper's protocol


# ---------------------------------------------------------------------------- the training step
def _setup(*flags: str):
    cfg, _ = train.parse_config(TINY + ["--model", "cnn_bn"] + list(flags))
    torch.manual_seed(0)
    model = models.build_model("cnn_bn", 10, (1, 8, 8), 1, 4)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return cfg, model, x, y, opt, torch.amp.GradScaler("cpu", enabled=False)


def _bn_state(model) -> list[torch.Tensor]:
    return [v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k]


def test_clean_forward_is_one_more_train_mode_forward_at_x_at_the_end_of_the_step():
    elle = ["--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1", "--elle_lambda", "10"]
    cfg, model, x, y, opt, scaler = _setup(*elle, "--clean_forward")
    torch.manual_seed(1)
    train.train_step(model, opt, scaler, x, y, cfg, train.StepState(), train.Stats(torch.device("cpu")), update=False)
    with_clean = _bn_state(model)
    cfg, model, x, y, opt, scaler = _setup(*elle)
    torch.manual_seed(1)
    train.train_step(model, opt, scaler, x, y, cfg, train.StepState(), train.Stats(torch.device("cpu")), update=False)
    without = _bn_state(model)
    with torch.no_grad():
        model(x)  # the same forward, after the step
    assert any(not torch.equal(a, b) for a, b in zip(with_clean, without))
    for a, b in zip(with_clean, _bn_state(model)):
        assert torch.equal(a, b)


def test_elle_a_statistics_start_at_the_first_training_step():
    cfg, model, x, y, opt, scaler = _setup("--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "1",
                                           "--elle_lambda", "50", "--elle_adaptive")
    st, stats = train.StepState(), train.Stats(torch.device("cpu"))
    train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=False)  # epoch 0's iteration
    rule = st.states["elle"]
    assert rule.count == 0 and rule.lam is None and float(stats.sums[1]) == 0.0
    errors = []
    for _ in range(3):
        torch.manual_seed(len(errors))
        errors.append(float(utils.elle_error(model, x, y, cfg.eps_frac).detach()))
        torch.manual_seed(len(errors) - 1)
        train.train_step(model, opt, scaler, x, y, cfg, st, stats, update=True)
    assert rule.count == 3
    assert float(rule.mean) == pytest.approx(np.mean(errors), rel=1e-5)  # the training steps' errors only


# -------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe, eps, dataset, model, word", [
    ("nfgsm", 16, "cifar10", "wrn28_10", "--nfgsm_noise_mult=4"),
    ("nfgsm", 16, "cifar10", "resnet18", "--nfgsm_noise_mult=2"),
    ("nfgsm", 14, "cifar10", "wrn28_10", "--nfgsm_noise_mult=2"),
    ("nfgsm", 12, "svhn", "resnet18", "--nfgsm_noise_mult=3"),
    ("nfgsm", 8, "svhn", "resnet18", "--nfgsm_noise_mult=2"),
    ("zerograd", 8, "svhn", "resnet18", "--zerograd_q=0.7"),
    ("zerograd", 8, "cifar100", "resnet18", "--zerograd_q=0.45"),
    ("zerograd", 8, "cifar10", "resnet18", "--zerograd_q=0.35"),
])
def test_recipe_settings_of_the_official_scripts(recipe, eps, dataset, model, word):
    assert word in methods.flags(recipe, eps, dataset, model)


def test_schedules_of_cifar100_and_of_zerograd_on_svhn():
    assert methods.flags("nfgsm", 8, "cifar100")[-2:] == ["--epochs=30", "--lr_max=0.2"]
    assert methods.flags("zerograd", 8, "svhn")[-2:] == ["--epochs=15", "--lr_max=0.01"]
    assert methods.flags("fgsm", 8, "svhn")[-2:] == ["--epochs=15", "--lr_max=0.05"]


def test_methods_cli_shows_the_wrn_setting_and_refuses_gradalign_on_cifar100(cli):
    out = cli("methods.py", "flags", "nfgsm", "--eps", "16", "--dataset", "cifar10", "--model", "wrn28_10")
    assert out.code == 0 and "--nfgsm_noise_mult=4" in out.out.split()
    out = cli("methods.py", "flags", "gradalign", "--eps", "8", "--dataset", "cifar100")
    assert out.code == 2 and out.err.count("\n") == 1 and "no published lambda for cifar100" in out.err


def test_own_protocol_words_carry_the_precision():
    assert methods.flags("fgsm", 8, "cifar10", protocol="own")[-1] == "--half_prec"
    own = methods.flags("elle_a", 8, "cifar10", protocol="own")
    assert own[-1] == "--protocol=own" and "--half_prec" not in own


# ---------------------------------------------------------------------------- the sweep and report
@pytest.mark.slow
def test_cifar10_sweep_runs_either_protocol():
    def dry(protocol: str) -> list[str]:
        env = {**os.environ, "DRY_RUN": "1", "PROTOCOL": protocol, "METHODS": "fgsm nfgsm elle_a", "EPS": "8",
               "SEEDS": "0"}
        return subprocess.run(["bash", "sh/exps_diff_eps_cifar10.sh"], cwd=ROOT, env=env, check=True,
                              capture_output=True, text=True).stdout.splitlines()
    paper, own = dry("paper"), dry("own")
    assert len(paper) == len(own) == 3
    names = {}
    for protocol, lines in (("paper", paper), ("own", own)):
        for line in lines:
            cfg, defaults = config.parse_config(line.split()[2:])  # every command passes the checks
            names[protocol, cfg.attack if cfg.elle_lambda == 0 else "elle_a"] = rundir.run_name(cfg, defaults)
    assert names["own", "fgsm"] == names["paper", "fgsm"]  # the paper's method: the same run
    for method in ("nfgsm", "elle_a"):  # fp32 instead of hp, and the protocol named before the seed
        paper_parts = [p for p in names["paper", method].split("_") if p != "hp"]
        assert names["own", method] == "_".join(paper_parts[:-1] + ["protoown", paper_parts[-1]])
    assert all("--half_prec" in line for line in paper)
    bad = subprocess.run(["bash", "sh/exps_diff_eps_cifar10.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "PROTOCOL": "ours"})
    assert bad.returncode == 2 and "unknown PROTOCOL 'ours'" in bad.stderr


def _write_run(root, argv: list[str], pgd: float) -> None:
    cfg, defaults = train.parse_config(argv)
    name = train.run_name(cfg, defaults)
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "config.json"), "w") as f:
        json.dump({**config.record(cfg), "run_name": name}, f)
    with open(os.path.join(root, name, "final.json"), "w") as f:
        json.dump({"last": {"clean_acc": 0.8, "pgd_acc": pgd, "cos_x_eta": 0.9}, "n_eval": 1000, "attack_iters": 50,
                   "n_restarts": 10, "eps": cfg.eps, "train_minutes": 1.0}, f)


def test_report_shows_both_protocols_side_by_side(tmp_path):
    common = ["--eps=8", "--n_final_eval=1000"]
    for seed, (paper_acc, own_acc) in enumerate(((0.40, 0.45), (0.42, 0.47))):
        _write_run(tmp_path, methods.flags("nfgsm", 8, "cifar10") + common + ["--half_prec", f"--seed={seed}"],
                   paper_acc)
        _write_run(tmp_path, methods.flags("nfgsm", 8, "cifar10", protocol="own") + common + [f"--seed={seed}"],
                   own_acc)
    _write_run(tmp_path, methods.flags("fgsm", 8, "cifar10") + common + ["--half_prec"], 0.0)
    runs = report.collect_runs([str(tmp_path)])
    assert all(r.counted for r in runs), [r.problem for r in runs if not r.counted]
    rows = report.aggregate(runs)
    assert [r["method"] for r in rows] == ["FGSM", "N-FGSM", "N-FGSM (own protocol)"]
    assert rows[1]["last_pgd_mean"] == pytest.approx(41.0) and rows[2]["last_pgd_mean"] == pytest.approx(46.0)
    assert rows[1]["flags"] == "" and rows[2]["flags"] == ""
    assert math.isfinite(rows[2]["last_clean_mean"])
