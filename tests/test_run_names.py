"""Run names and the settings config.json records: every setting is declared once and classified (in
the run name or listed as changing nothing), values that round alike get distinct names, the protocols
resolve to their papers' settings, and the method registry that flags, names and recipes come from.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re

import pytest
import torch

import config
import eval as eval_py
import methods
import report
import rundir
import sweep
import train
import utils
from tests.fixtures import ROOT, RUN, TINY, read_metrics, run_dir_of


# ------------------------------------------------------------------------------------------ run names
def test_defaults_leave_run_names_alone_and_each_new_setting_is_named():
    base, defaults = train.parse_config(TINY)
    name = train.run_name(base, defaults)
    for short in ("nk", "zq", "elle", "g1", "gaev", "gafd"):
        assert f"_{short}" not in name
    # --fgsm_alpha's default is still 1.25 for fgsm: an explicit 1.25 changes nothing
    assert train.run_name(train.parse_config(TINY + ["--fgsm_alpha", "1.25"])[0], defaults) == name
    names = {name}
    for flags in (["--attack", "nfgsm"], ["--attack", "nfgsm", "--nfgsm_noise_mult", "1"],
                  ["--attack", "nfgsm", "--fgsm_alpha", "1.25"], ["--zerograd_q", "0.35"], ["--elle_lambda", "10"],
                  ["--elle_lambda", "10", "--elle_adaptive"], ["--grad_align_cos_lambda", "1"],
                  ["--grad_align_cos_lambda", "1", "--grad_align_grad1", "graph"],
                  ["--grad_align_cos_lambda", "1", "--grad_align_every", "4"],
                  ["--grad_align_cos_lambda", "1", "--grad_align_fd", "0.001"]):
        cfg, flag_defaults = train.parse_config(TINY + flags)
        new = train.run_name(cfg, flag_defaults)
        assert new not in names, flags
        names.add(new)
    # N-FGSM's own default step is 1.0: named only when it differs
    cfg, flag_defaults = train.parse_config(TINY + ["--attack", "nfgsm"])
    assert cfg.fgsm_alpha == 1.0 and "_fa" not in train.run_name(cfg, flag_defaults)


# What each later method's official script sets beyond its flags on CIFAR-10, restated from the
# scripts: the cyclic schedule peaks at mid-training (up and down steps of half the iterations each, or
# epochs // 2), no mixed precision, and N-FGSM and ZeroGrad normalise the inputs by the CIFAR-10 mean
# and std; ELLE's loss ends with a clean forward at x in train mode, whose output is only logged. Each
# trains its authors' PreAct ResNet-18 (N-FGSM's own; Rice et al.'s in ZeroGrad's and ELLE's code),
# and ZeroGrad's code (MultiGrad's too) pads its CIFAR-10 crops by reflection.
NF, RICE = {"model": "resnet18_nfgsm"}, {"model": "resnet18_rice"}
OWN_CIFAR10 = {
    "nfgsm": {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar10", **NF},
    "zerograd": {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar10", "augment": "reflect", **RICE},
    "multigrad": {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar10", "augment": "reflect", **RICE},
    "elle": {"protocol": "own", "lr_peak": 0.5, "clean_forward": True, **RICE},
    "elle_a": {"protocol": "own", "lr_peak": 0.5, "clean_forward": True, **RICE},
}
# On SVHN their scripts peak at 2/5, as this paper; N-FGSM normalises by its SVHN statistics, ZeroGrad
# by mean 0.5 and std 0.5 and does not augment. On CIFAR-100, N-FGSM and ZeroGrad use the CIFAR-100
# statistics, and ZeroGrad rotates the images.
OWN_OTHER = {
    ("nfgsm", "svhn"): {"protocol": "own", "normalize": "svhn", **NF},
    ("zerograd", "svhn"): {"protocol": "own", "normalize": "half", "augment": "none", **RICE},
    ("elle_a", "svhn"): {"protocol": "own", "clean_forward": True, **RICE},
    ("nfgsm", "cifar100"): {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar100", **NF},
    ("zerograd", "cifar100"): {"protocol": "own", "lr_peak": 0.5, "normalize": "cifar100", "augment": "rotate",
                               **RICE},
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
    # the rest comes with the protocol; the network leads the name
    assert own_name == paper_name.replace("_seed0", "_protoown_seed0").replace("_resnet18_", f"_{own['model']}_")
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


def test_methods_cli_shows_the_wrn_setting_and_refuses_gradalign_on_cifar100(cli):
    out = cli("sweep.py", "flags", "nfgsm", "--eps", "16", "--dataset", "cifar10", "--model", "wrn28_10")
    assert out.code == 0 and "--nfgsm_noise_mult=4" in out.out.split()
    out = cli("sweep.py", "flags", "gradalign", "--eps", "8", "--dataset", "cifar100")
    assert out.code == 2 and out.err.count("\n") == 1 and "no published lambda for cifar100" in out.err


def test_own_protocol_words_carry_the_precision():
    assert methods.flags("fgsm", 8, "cifar10", protocol="own")[-1] == "--half_prec"
    own = methods.flags("elle_a", 8, "cifar10", protocol="own")
    assert own[-2:] == ["--protocol=own", "--model=resnet18_rice"] and "--half_prec" not in own


# ------------------------------------------------------------------------- a method from outside
def double_step_fgsm(model, x, y, cfg, st) -> methods.Perturbation:
    """A toy method: FGSM from zero with twice the step (2 * fgsm_alpha * eps), clipped to the eps-ball."""
    eps = cfg.eps_frac
    delta0 = torch.zeros_like(x)
    delta, grad = utils.fgsm_attack(model, x, y, delta0, eps, 2 * cfg.fgsm_alpha * eps, cfg.clamp_grad,
                                    create_graph=st.grad1_graph)
    double_step_fgsm.calls += 1
    return methods.Perturbation(delta, grad, delta0, cfg.clamp_grad)


@pytest.fixture
def toy_method():
    double_step_fgsm.calls = 0
    entry = methods.register(methods.Method(
        "fgsm2x", "FGSM (2x step)", "2", perturb=double_step_fgsm,
        recipes={"fgsm2x": methods.Recipe(("--attack=fgsm", "--attack_init=zero", "--method=fgsm2x"))}))
    yield entry
    methods.unregister("fgsm2x")


def test_a_method_registered_from_outside_trains_reports_and_is_listed(tmp_path, toy_method, capsys):
    flags = ["--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "0.25"]
    argv = TINY + ["--out_dir", str(tmp_path / "runs"), *flags, "--method", "fgsm2x"]
    assert train.main(argv) == 0
    assert double_step_fgsm.calls == 1 + 4  # epoch 0's one iteration, then 4 per epoch
    cfg, defaults = config.parse_config(argv)
    name = rundir.run_name(cfg, defaults)
    plain = rundir.run_name(*config.parse_config(TINY + flags))
    assert name == plain.replace("_seed0", "_fgsm2x_seed0")  # the plain FGSM run's name, plus the method
    run_dir = tmp_path / "runs" / name
    settings = json.loads((run_dir / "config.json").read_text())
    assert settings["method"] == "fgsm2x" and settings["run_name"] == name
    assert [r["iteration"] for r in read_metrics(str(run_dir))] == [0, 2, 4]
    final = json.loads((run_dir / "final.json").read_text())
    assert 0 <= final["last"]["pgd_acc"] <= final["last"]["clean_acc"] <= 1
    # report.py: its own row, under its label and cost
    (row,) = report.aggregate(report.collect_runs([str(tmp_path / "runs")]))
    assert (row["method"], row["passes"], row["n_seeds"]) == ("FGSM (2x step)", "2", 1)
    # the listing and the recipe
    capsys.readouterr()
    assert sweep.main(["list"]) == 0
    assert capsys.readouterr().out.split()[-1] == "fgsm2x"
    assert methods.flags("fgsm2x", 8, "digits") == ["--attack=fgsm", "--attack_init=zero", "--method=fgsm2x"]


def test_the_toy_method_changes_the_step_and_the_flags_alone_do_not_select_it(toy_method):
    cfg, _ = config.parse_config(TINY + ["--attack", "fgsm", "--attack_init", "zero", "--fgsm_alpha", "0.25"])
    assert methods.select(cfg)[0].name == "fgsm" and methods.label_of(cfg) == "FGSM"
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(8, 1, 8, 8) * 0.5 + 0.25, torch.randint(0, 10, (8,))
    plain = methods.perturb_fgsm(model, x, y, cfg, train.StepState()).delta
    double = double_step_fgsm(model, x, y, cfg, train.StepState()).delta
    assert torch.allclose(double, 2 * plain)  # inside the box and the ball: twice FGSM's step


def test_existing_commands_keep_their_names_and_config_without_a_method_field(tmp_path):
    cfg, defaults = config.parse_config(["--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=0.2"])
    assert rundir.run_name(cfg, defaults) == "cifar10_resnet18_fgsm_zero_eps8_lam0.2_seed0"
    assert "method" not in config.record(cfg)
    # the settings added since (method, the protocol's) are recorded only when not at their default
    unrecorded = {"method", "methods_file", "lr_peak", "normalize", "clean_forward", "protocol", "augment",
                  "wrn_depth", "wrn_width", "multigrad_samples", "multigrad_agree", "threads", "log_to"}
    assert config.record(cfg) == {k: v for k, v in vars(config.build_parser().parse_args([
        "--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=0.2"])).items()
        if k not in unrecorded} | {"fgsm_alpha": 1.25, "model": "resnet18"}


def test_method_must_agree_with_the_flags_of_a_method_that_has_them(capsys):
    with pytest.raises(SystemExit) as exc:
        config.parse_config(["--attack", "pgd", "--method", "nfgsm"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--method nfgsm does not match the other flags" in err and len(err.strip().splitlines()) == 1
    cfg, _ = config.parse_config(["--attack", "nfgsm", "--method", "nfgsm"])
    assert methods.label_of(cfg) == "N-FGSM"


def test_every_flag_combination_selects_at_most_one_entry_of_each_role():
    for key in methods.recipes():
        cfg, _ = config.config_and_defaults(config.build_parser().parse_args(methods.flags(key, 8, "cifar10")))
        perturbations = [m for m in methods.REGISTRY.values() if m.perturb and m.selects(cfg)]
        regularisers = [m for m in methods.REGISTRY.values() if m.regularise and m.selects(cfg)]
        assert len(perturbations) == 1 and len(regularisers) <= 1, key


# ---------------------------------------------------------------------------- flags declared once
def test_every_setting_is_declared_once_and_classified():
    for name, meta in config.FIELDS.items():
        assert (meta["short"] is not None) != (meta["unnamed"] is not None), f"{name}: name it or say why not"
        assert isinstance(meta["compare"], bool) and meta["help"], name
    with pytest.raises(ValueError, match="exactly one"):
        config.flag(0, "a setting the run name does not know about")
    parser = config.build_parser()
    assert {a.dest for a in parser._actions} - {"help"} == set(config.FIELDS)
    assert set(rundir.NAME_FIELDS) | set(rundir.NOT_NAMED) == set(config.FIELDS)
    assert {n for n, m in config.FIELDS.items() if not m["compare"]} <= report.NOT_COMPARED
    assert not set(config.FIELDS) - {n for n, m in config.FIELDS.items() if not m["compare"]} & report.NOT_COMPARED


def test_eval_takes_the_shared_flags_from_the_same_declarations():
    actions = {a.dest: a for a in eval_py.build_parser()._actions}
    for name in eval_py.SHARED:
        if name not in ("half_prec", "attack_iters"):  # eval.py says what these mean for it
            assert actions[name].help.startswith(config.FIELDS[name]["help"]), name
    # on a run, the run's final evaluation; on a bare checkpoint, eval.py's own defaults
    assert actions["dataset"].default is None and actions["batch_size_eval"].default is None
    assert eval_py.OWN_DEFAULTS["batch_size_eval"] == 1024 and actions["batch_size_eval"].help.endswith("else 1024)")
    assert actions["attack_iters"].default is None and actions["attack_iters"].type("1") == 1  # with its bound
    assert actions["eps"].default is None and actions["eps"].type is float  # the run's eps, else 8


def test_each_recipe_file_says_what_it_trains_and_parses(monkeypatch):
    monkeypatch.chdir(ROOT)  # a recipe names the files it includes from the repository root
    files = sorted(f for f in os.listdir("recipes") if f.endswith(".args"))
    assert files
    for name in files:
        with open(os.path.join("recipes", name)) as f:
            assert f.readline().startswith("# trains "), name  # the first line says what it trains
        config.parse_config([f"@recipes/{name}"])


def test_each_method_recipe_is_the_protocol_plus_the_method_flags_of_the_table(monkeypatch):
    monkeypatch.chdir(ROOT)
    method_files = sorted(f for f in os.listdir("recipes") if re.fullmatch(r"\w+_cifar10_eps[\d.]+\.args", f))
    paper = {key for key, recipe in methods.recipes().items() if recipe.paper}
    assert {f.split("_cifar10")[0] for f in method_files} == paper  # the paper's six methods at eps 8
    for name in method_files:
        method, dataset, eps = name[:-len(".args")].rsplit("_", 2)
        eps = sweep.number(eps.removeprefix("eps"))
        from_file, _ = config.parse_config([f"@recipes/{name}"])
        table = ["@recipes/cifar10_protocol.args", f"--eps={eps}", *methods.flags(method, eps, dataset)]
        assert from_file == config.parse_config(table)[0], name


# ------------------------------------------------------------------------------------------ run names
def _another_value(action: argparse.Action, current):
    """A valid value of a flag other than `current`."""
    if action.choices:
        return next(c for c in action.choices if c != current)
    if isinstance(current, bool) or current is None:
        return not current
    return current + 1 if isinstance(current, int) else current * 2 + 1


def test_every_config_field_is_in_the_run_name_or_listed_as_changing_nothing():
    fields = {f.name for f in dataclasses.fields(config.Config)}
    assert not set(rundir.NAME_FIELDS) & set(rundir.NOT_NAMED)
    assert fields == set(rundir.NAME_FIELDS) | set(rundir.NOT_NAMED), "name the new field, or list it in NOT_NAMED"
    parser = config.build_parser()
    base_cfg, defaults = config.parse_config(TINY)
    base = rundir.run_name(base_cfg, defaults)
    actions = {a.dest: a for a in parser._actions}
    for field in rundir.NAME_FIELDS:
        value = _another_value(actions[field], getattr(base_cfg, field))
        changed = rundir.run_name(dataclasses.replace(base_cfg, **{field: value}), defaults)
        assert changed != base, f"--{field} is listed as named but does not change the name"
    for field in ("dataset", "model", "attack", "attack_init", "eps", "grad_align_cos_lambda", "seed"):
        value = _another_value(actions[field], getattr(base_cfg, field))
        assert rundir.run_name(dataclasses.replace(base_cfg, **{field: value}), defaults) != base, field


def test_run_name_changes_with_every_result_setting():
    base, defaults = train.parse_config(TINY)
    names = {train.run_name(base, defaults)}
    for flag, value in [("--seed", "1"), ("--eps", "8"), ("--grad_align_cos_lambda", "0.2"), ("--lr_max", "0.3"),
                        ("--clamp_grad", "zero"), ("--half_prec", None), ("--attack_init", "zero"),
                        ("--minibatch_replay", "8"), ("--fgsm_alpha", "1.0"), ("--epochs", "30"),
                        ("--batch_size_eval", "7"), ("--no-data_on_device", None)]:
        args = TINY + ([flag] if value is None else [flag, value])
        cfg, _ = train.parse_config(args)
        name = train.run_name(cfg, defaults)
        assert " " not in name and name not in names, (flag, name)
        names.add(name)
    cfg, _ = train.parse_config(TINY + ["--device", "cuda", "--out_dir", "elsewhere"])
    assert train.run_name(cfg, defaults) == train.run_name(base, defaults)


# ------------------------------------------------------------------------- 4: names keep every digit
def test_4_run_names_tell_apart_values_that_round_alike_and_keep_the_short_form():
    assert [rundir.name_number(v) for v in (0.01, 76.5, 5e-4, 1e-5, 30, 0.3, 2.0)] == [
        "0.01", "76.5", "0.0005", "1e-05", "30", "0.3", "2"]
    assert rundir.name_number(0.01234561) == "0.01234561" != rundir.name_number(0.01234564)
    assert rundir.name_number(1 / 3) == repr(1 / 3)
    for value in (0.01234561, 1 / 3, 123456789.0, 7):  # what a name says reads back as the value
        assert float(rundir.name_number(value)) == value
    names = {os.path.basename(run_dir_of("", [*RUN, "--lr_max", lr])) for lr in ("0.01234561", "0.01234564")}
    assert len(names) == 2
    names = {os.path.basename(run_dir_of("", [*RUN, "--eps", eps])) for eps in ("8.0000001", "8.0000004")}
    assert len(names) == 2


def test_4_a_run_whose_value_rounds_like_a_finished_ones_trains(tmp_path, cli):
    first = cli("train.py", *TINY, "--epochs", "0", "--lr_max", "0.01234561", "--out_dir", tmp_path)
    assert first.code == 0
    second = cli("train.py", *TINY, "--epochs", "0", "--lr_max", "0.01234564", "--out_dir", tmp_path)
    assert second.code == 0 and "is finished" not in second.out and len(os.listdir(tmp_path)) == 2
