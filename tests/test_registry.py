"""The method registry and the declared flags: a method added from outside runs end to end, every
setting is declared once and classified, argument files, and resume.pt keeps its format."""
from __future__ import annotations

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
import train
import utils
from tests.fixtures import TINY, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert methods.main(["list"]) == 0
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
    unrecorded = {"method", "lr_peak", "normalize", "clean_forward", "protocol"}
    assert config.record(cfg) == {k: v for k, v in vars(config.build_parser().parse_args([
        "--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=0.2"])).items()
        if k not in unrecorded} | {"fgsm_alpha": 1.25}


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


def test_register_rejects_a_taken_name_or_recipe():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.Method("fgsm", "x", perturb=methods.perturb_fgsm))
    with pytest.raises(ValueError, match="taken"):
        methods.register(methods.Method("other", "x", perturb=methods.perturb_fgsm,
                                        recipes={"pgd10": methods.Recipe(())}))
    assert "other" not in methods.REGISTRY


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
        if name != "half_prec":  # eval.py says what --half_prec means for it
            assert actions[name].help.startswith(config.FIELDS[name]["help"]), name
    assert actions["dataset"].default is None and actions["batch_size_eval"].default == 1024
    assert actions["eps"].default is None and actions["eps"].type is float  # the run's eps, else 8


# ------------------------------------------------------------------------------- argument files
def test_an_argument_file_gives_several_flags_per_line_with_comments_and_later_flags_override(tmp_path):
    path = tmp_path / "x.args"
    path.write_text("# GradAlign on digits\n--dataset digits --model cnn   # the small CNN\n\n"
                    "--eps 8\n--grad_align_cos_lambda 0.5\n")
    cfg, _ = config.parse_config([f"@{path}", "--eps", "12"])
    assert (cfg.dataset, cfg.model, cfg.grad_align_cos_lambda, cfg.eps) == ("digits", "cnn", 0.5, 12)


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
        eps = methods.number(eps.removeprefix("eps"))
        from_file, _ = config.parse_config([f"@recipes/{name}"])
        table = ["@recipes/cifar10_protocol.args", f"--eps={eps}", *methods.flags(method, eps, dataset)]
        assert from_file == config.parse_config(table)[0], name


# ------------------------------------------------------------------------------------ resume.pt
# The keys of resume.pt as every earlier version wrote them (the loop, the finite checks, the methods'
# states, the RNGs and the metrics lines).
RESUME_KEYS = {"best_acc", "best_state", "elle", "first_bad_iter", "free_delta", "iteration", "metrics_lines",
               "model", "next_epoch", "opt", "rng", "scaler", "skipped_in_a_row", "skipped_steps", "stalled_at",
               "train_seconds"}


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", [["--minibatch_replay", "2", "--fgsm_alpha", "1"],
                                    ["--elle_lambda", "4000", "--elle_adaptive", "--attack_init", "zero"]])
def test_a_resume_pt_in_the_earlier_format_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, method):
    args = TINY + ["--epochs", "2", "--attack", "fgsm", *method]
    assert train.main(args + ["--out_dir", str(tmp_path / "full")]) == 0
    save = rundir.save_resume_state

    def save_then_stop(run_dir, state, generator):
        save(run_dir, state, generator)
        if state["next_epoch"] == 2:
            raise _Interrupt
    monkeypatch.setattr(rundir, "save_resume_state", save_then_stop)
    with pytest.raises(_Interrupt):
        train.main(args + ["--out_dir", str(tmp_path / "cut")])
    monkeypatch.undo()
    name = rundir.run_name(*config.parse_config(args))
    path = tmp_path / "cut" / name / train.RESUME_FILE
    saved = torch.load(path, weights_only=False)
    assert set(saved) == RESUME_KEYS | {"run_name", "settings_hash"}  # the keys that tie it to its run
    torch.save({k: saved[k] for k in RESUME_KEYS}, path)  # exactly the earlier format, nothing else
    assert train.main(args + ["--out_dir", str(tmp_path / "cut")]) == 0

    def numbers(root):
        final = json.loads((root / name / "final.json").read_text())
        rows = read_metrics(str(root / name))
        untimed = {"train_minutes", "elapsed_s"}
        return ({k: v for k, v in final.items() if k not in untimed},
                [{k: v for k, v in r.items() if k not in untimed} for r in rows])
    assert numbers(tmp_path / "cut") == numbers(tmp_path / "full")
