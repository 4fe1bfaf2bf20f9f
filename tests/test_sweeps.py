"""The sweep scripts in sh/ print exactly the authors' sweeps with DRY_RUN=1."""
from __future__ import annotations

import os
import shlex
import stat
import subprocess

import pytest

import config
import methods
import train

pytestmark = pytest.mark.slow  # runs the shell scripts (each calls python for the method table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR, SVHN, CNN = "sh/exps_diff_eps_cifar10.sh", "sh/exps_diff_eps_svhn.sh", "sh/cnn_single_layer.sh"
COMMON = {"--eval_iter_freq": "200", "--batch_size_eval": "1024", "--half_prec": True,
          "--eval_early_stopped_model": True, "--n_final_eval": "1000"}
# GradAlign's lambda in the authors' scripts, verbatim (CIFAR-10 eps 14: 1.124, not the formula's 1.125).
CIFAR_LAMBDA = ["0.027", "0.036", "0.047", "0.063", "0.084", "0.112", "0.150", "0.200", "0.267", "0.356", "0.474",
                "0.632", "0.843", "1.124", "1.500", "2.000"]
SVHN_LAMBDA = ["1.657", "1.757", "1.864", "1.976", "2.096", "2.223", "2.357", "2.500", "2.651", "2.812", "2.982",
               "3.162"]
SETTINGS = {  # dataset: (script, eps range, epochs, lr_max, GradAlign lr_max, Free-AT epochs, Free-AT lr_max, lambdas)
    "cifar10": (CIFAR, range(1, 17), "30", "0.2", "0.30", "96", "0.04", CIFAR_LAMBDA),
    "svhn": (SVHN, range(1, 13), "15", "0.05", "0.05", "45", "0.01", SVHN_LAMBDA),
}


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """The commands a script prints with DRY_RUN=1, each split with shell rules."""
    out = subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "DRY_RUN": "1", **env})
    return [shlex.split(line) for line in out.stdout.splitlines()]


def flags(argv: list[str]) -> dict:
    """{--flag: value (True for a bare flag)}; fails on a repeated flag (the authors' lr_max trap)."""
    assert argv[:2] == ["python", "train.py"], argv
    result = {}
    for word in argv[2:]:
        key, _, value = word.partition("=")
        assert key not in result, f"{key} given twice in {argv}"
        result[key] = value if value else True
    return result


def expected_flags(dataset: str, method: str, eps: int, seed: int) -> dict:
    """The command of (method, eps, seed) in the authors' sweep scripts."""
    _, _, epochs, lr, ga_lr, free_epochs, free_lr, lambdas = SETTINGS[dataset]
    e = str(eps)
    method_flags = {
        "FGSM": {"--attack": "fgsm", "--attack_init": "zero", "--epochs": epochs, "--lr_max": lr},
        "FGSM-RS": {"--attack": "fgsm", "--attack_init": "random", "--epochs": epochs, "--lr_max": lr},
        "GradAlign": {"--attack": "fgsm", "--attack_init": "zero", "--epochs": epochs, "--lr_max": ga_lr,
                      "--grad_align_cos_lambda": lambdas[eps - 1]},
        "PGD-2": {"--attack": "pgd", "--attack_init": "zero", "--pgd_train_n_iters": "2",
                  "--pgd_alpha_train": f"{eps / 2:g}", "--epochs": epochs, "--lr_max": lr},
        "PGD-10": {"--attack": "pgd", "--attack_init": "zero", "--pgd_train_n_iters": "10",
                   "--pgd_alpha_train": f"{eps / 5:g}", "--epochs": epochs, "--lr_max": lr},
        "Free-AT": {"--attack": "fgsm", "--attack_init": "zero", "--fgsm_alpha": "1.0", "--minibatch_replay": "8",
                    "--epochs": free_epochs, "--lr_max": free_lr},
    }[method]
    return {"--dataset": dataset, **method_flags, "--eps": e, **COMMON, "--seed": str(seed)}


def method_of(f: dict) -> str:
    if f.get("--minibatch_replay") == "8":
        return "Free-AT"
    if f["--attack"] == "pgd":
        return f"PGD-{f['--pgd_train_n_iters']}"
    if "--grad_align_cos_lambda" in f:
        return "GradAlign"
    return "FGSM" if f["--attack_init"] == "zero" else "FGSM-RS"


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_the_full_sweep_is_the_reference_one(dataset):
    script, eps_range = SETTINGS[dataset][:2]
    commands = [flags(argv) for argv in dry_run(script)]
    assert len(commands) == 6 * len(eps_range) * 5  # 480 for CIFAR-10, 360 for SVHN
    seen = set()
    for f in commands:
        key = (method_of(f), int(f["--eps"]), int(f["--seed"]))
        assert f == expected_flags(dataset, *key)
        seen.add(key)
    methods = {"FGSM", "FGSM-RS", "GradAlign", "PGD-2", "PGD-10", "Free-AT"}
    assert seen == {(m, e, s) for m in methods for e in eps_range for s in range(5)}


def test_spot_values_of_the_spec():
    by_key = {(method_of(f), f["--eps"]): f for f in map(flags, dry_run(CIFAR, SEEDS="0"))}
    assert by_key["GradAlign", "8"]["--grad_align_cos_lambda"] == "0.200"
    assert by_key["GradAlign", "8"]["--lr_max"] == "0.30"
    assert by_key["GradAlign", "14"]["--grad_align_cos_lambda"] == "1.124"  # the script's value, not 1.125
    assert by_key["GradAlign", "16"]["--grad_align_cos_lambda"] == "2.000"
    assert by_key["PGD-2", "8"]["--pgd_alpha_train"] == "4"
    assert by_key["PGD-10", "8"]["--pgd_alpha_train"] == "1.6"
    assert by_key["Free-AT", "8"]["--epochs"] == "96"
    svhn = {(method_of(f), f["--eps"]): f for f in map(flags, dry_run(SVHN, SEEDS="0"))}
    assert svhn["GradAlign", "8"]["--grad_align_cos_lambda"] == "2.500"
    assert svhn["GradAlign", "12"]["--grad_align_cos_lambda"] == "3.162"
    assert svhn["GradAlign", "12"]["--lr_max"] == "0.05"
    assert (svhn["Free-AT", "3"]["--epochs"], svhn["Free-AT", "3"]["--lr_max"]) == ("45", "0.01")


@pytest.mark.parametrize("script", [CIFAR, SVHN, CNN])
def test_every_command_parses_and_names_a_distinct_run(script):
    names = set()
    for argv in dry_run(script):
        cfg, defaults = train.parse_config(argv[2:])
        names.add(train.run_name(cfg, defaults))
    assert len(names) == len(dry_run(script))  # relaunching never mixes two settings up


def test_overrides_select_methods_eps_and_seeds():
    commands = [flags(a) for a in dry_run(CIFAR, METHODS="gradalign pgd2", EPS="8 16", SEEDS="0 3")]
    assert len(commands) == 2 * 2 * 2
    assert {(method_of(f), f["--eps"], f["--seed"]) for f in commands} == {
        (m, e, s) for m in ("GradAlign", "PGD-2") for e in ("8", "16") for s in ("0", "3")}
    assert len(dry_run(SVHN, METHODS="free_at", SEEDS="2")) == 12


def test_unknown_method_is_refused():
    out = subprocess.run(["bash", SVHN], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "METHODS": "fgsm fgsm_free"})
    assert out.returncode == 2 and "fgsm_free" in out.stderr and out.stdout == ""


def test_extra_arguments_are_appended_to_every_command():
    commands = dry_run(CIFAR, "--data_dir=/data/my cifar", "--out_dir=runs/c10", EXTRA="--download --gpu=1",
                       SEEDS="0", EPS="8")
    assert len(commands) == 6
    for argv in commands:
        assert argv[-4:] == ["--download", "--gpu=1", "--data_dir=/data/my cifar", "--out_dir=runs/c10"]


@pytest.mark.parametrize("script", [CIFAR, SVHN])
def test_final_autoattack_passes_through_to_every_run(script):
    commands = dry_run(script, "--final_autoattack", SEEDS="0", EPS="8")
    assert len(commands) == 6
    for argv in commands:
        assert argv[-1] == "--final_autoattack" and config.build_parser().parse_args(argv[2:]).final_autoattack


def test_cnn_single_layer_runs_fgsm_with_and_without_gradalign():
    commands = [flags(a) for a in dry_run(CNN)]
    assert len(commands) == 2 * 5
    base = {"--dataset": "cifar10", "--model": "cnn", "--n_layers": "1", "--n_filters_cnn": "4", "--attack": "fgsm",
            "--eps": "10", "--attack_init": "zero", "--epochs": "30", "--eval_iter_freq": "50", "--lr_max": "0.003",
            "--n_final_eval": "1000"}
    for f in commands:
        assert {k: f[k] for k in base} == base
        assert "--half_prec" not in f
    lambdas = sorted({f["--grad_align_cos_lambda"] for f in commands})
    assert lambdas == ["0", "0.356"]  # 0.02 * 10^(10/8) = 0.3557
    assert sorted(f["--seed"] for f in commands) == sorted("0011223344")


def test_without_dry_run_the_commands_go_to_the_launcher(tmp_path):
    """PYTHON stands in for the interpreter: a fake one records its arguments and stdin."""
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/usr/bin/env bash\necho \"$@\" > {tmp_path}/args\ncat > {tmp_path}/stdin\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(fake), "JOBS": "3", "LAUNCHER_ARGS": "--log_dir /tmp/l", "SEEDS": "0"}
    env.pop("DRY_RUN", None)
    subprocess.run(["bash", CNN, "--out_dir=x"], cwd=ROOT, env=env, check=True)
    assert (tmp_path / "args").read_text().split() == ["launch.py", "--jobs", "3", "--log_dir", "/tmp/l"]
    lines = (tmp_path / "stdin").read_text().splitlines()
    assert lines == [" ".join(a) for a in dry_run(CNN, "--out_dir=x", SEEDS="0")]


def test_successor_methods_with_their_papers_settings():
    commands = dry_run(CIFAR, METHODS="nfgsm zerograd elle elle_a", EPS="8 16", SEEDS="0")
    by_key = {}
    for argv in commands:
        f = flags(argv)
        cfg, _ = train.parse_config(argv[2:])  # every command passes train.py's checks
        method = ("nfgsm" if f["--attack"] == "nfgsm" else "zerograd" if "--zerograd_q" in f
                  else "elle_a" if "--elle_adaptive" in f else "elle")
        by_key[method, f["--eps"]] = (f, cfg)
        assert {k: f[k] for k in ("--epochs", "--lr_max", "--n_final_eval")} == {
            "--epochs": "30", "--lr_max": "0.2", "--n_final_eval": "1000"}
    assert len(by_key) == 8
    for eps in ("8", "16"):
        cfg = by_key["nfgsm", eps][1]
        assert (cfg.fgsm_alpha, cfg.nfgsm_noise_mult) == (1.0, 2.0)
        cfg = by_key["zerograd", eps][1]
        assert (cfg.attack_init, cfg.fgsm_alpha, cfg.zerograd_q) == ("random", 2.0, 0.35)
        cfg = by_key["elle_a", eps][1]
        assert (cfg.attack_init, cfg.fgsm_alpha, cfg.elle_lambda, cfg.elle_adaptive) == ("zero", 1.0, 4000, True)
    assert by_key["elle", "8"][1].elle_lambda == 1000 and by_key["elle", "16"][1].elle_lambda == 5000
    # the default sweep stays the paper's six methods
    assert len(dry_run(CIFAR, SEEDS="0", EPS="8")) == 6


def test_the_cifar10_recipe_files_are_the_sweep_commands_at_eps_8(monkeypatch):
    monkeypatch.chdir(ROOT)  # a recipe names the files it includes from the repository root
    for key in (k for k, recipe in methods.recipes().items() if recipe.paper):
        (argv,) = dry_run(CIFAR, SEEDS="0", EPS="8", METHODS=key)
        assert config.parse_config([f"@recipes/{key}_cifar10_eps8.args"])[0] == config.parse_config(argv[2:])[0], key
