"""A method in a researcher's own file: register()'s checks, train.py --methods_file (config.json
records the file and its sha256), config.py's check of its flags, report.py, eval.py, sweep.py and the
sweeps loading it again from
that record, a missing or changed file named in one line, and the guide's example run from outside
the repository exactly as docs/adding_a_method.md writes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import config
import methods
import report
import rundir
import train
from tests.fixtures import ROOT, TINY, edit_json, eval_main, one_line, report_main, run_dir_of, snapshot

GUIDE = os.path.join(ROOT, "docs", "adding_a_method.md")
FGSM2X = ["--attack", "fgsm", "--attack_init", "zero", "--method", "fgsm2x"]


def guide_file() -> str:
    """The guide's first Python block: a complete methods file."""
    with open(GUIDE) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.MULTILINE | re.DOTALL)[0]


def write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the guide's file, a finished fgsm2x run trained in-process with it, its argv) ; the file is then
    unloaded, as in a new process. The run keeps its resume.pt (for the resume test)."""
    folder = tmp_path_factory.mktemp("methods_file")
    path = write(folder / "fgsm2x.py", guide_file())
    argv = TINY + ["--methods_file", path, *FGSM2X, "--out_dir", str(folder / "runs")]
    before = methods.snapshot()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rundir, "remove_resume_state", lambda run_dir: None)
        assert train.main(argv) == 0
        run_dir = run_dir_of(folder / "runs", argv)
    methods.restore(before)
    return path, run_dir, argv


def copy_run(run_dir: str, tmp_path, methods_file: str) -> str:
    """A copy of the run under tmp_path/runs whose config.json names methods_file."""
    copy = shutil.copytree(run_dir, tmp_path / "runs" / os.path.basename(run_dir))
    edit_json(os.path.join(copy, "config.json"), methods_file=methods_file)
    return str(copy)


# ------------------------------------------------------------------------------------ register()
def perturb(model, x, y, cfg, st):
    return methods.perturb_fgsm(model, x, y, cfg, st)


def regularise(model, x, y, cfg, st, grad1, pert):
    return grad1.sum()


def no_grad1(model, x, y, cfg, st, grad1, pert):
    return x.sum() * 0


GOOD = dict(name="toy", label="Toy", passes="2", perturb=perturb,
            recipes={"toy": methods.Recipe(("--attack=fgsm", "--attack_init=zero", "--method=toy"))})
GOOD_REG = dict(name="toyreg", label=lambda cfg, base: f"{base} + Toy", passes={"2": "2+dbl"}, regularise=regularise,
                start_grad=lambda cfg: True)


@pytest.mark.parametrize("fields, rows, error, fragment", [
    ({"name": "Toy Method"}, None, ValueError, "lowercase letters"),
    ({"name": "fgsm"}, None, ValueError, "built-in method"),
    ({"regularise": regularise}, None, ValueError, "exactly one of perturb= and regularise="),
    ({"perturb": lambda model, x, y, cfg: x}, None, TypeError, "perturb= is called as perturb(model, x, y, cfg, st)"),
    ({"perturb": None, "regularise": lambda model, x, y, cfg, st, grad1: x, "label": lambda c, b: b},
     ["Toy + x"], TypeError, "regularise= is called as regularise(model, x, y, cfg, st, grad1, pert)"),
    ({"perturb": None, "regularise": regularise, "start_grad": lambda cfg: True}, None, TypeError,
     "a regulariser's label is a function of (cfg, base)"),
    ({"perturb": None, "regularise": regularise, "label": lambda c, b: b}, ["Toy + x"], ValueError,
     "regularise reads grad1"),
    ({"start_grad": lambda cfg: False}, None, ValueError, "start_grad= and active= are a regulariser's"),
    ({"label": lambda cfg, base: "x"}, ["Toy"], TypeError, "label= is called as label(cfg)"),
    ({"label": 3}, None, TypeError, "label must be a string or a function"),
    ({"label": lambda cfg: "Toy"}, None, ValueError, "give register(..., rows=[...])"),
    ({"label": "FGSM"}, None, ValueError, "the label 'FGSM' is another method's"),
    ({"label": "a | b"}, None, ValueError, "without '|'"),
    ({"passes": "?"}, None, ValueError, "passes='?'"),
    ({"passes": {"2": "3"}}, None, ValueError, "passes={'2': '3'}"),
    ({"when": lambda: True}, None, TypeError, "when= is called as when(cfg)"),
    ({"attack": "fgsm3"}, None, ValueError, "attack='fgsm3' is not a train.py --attack"),
    ({"state": lambda cfg: None}, None, ValueError, "give state= and state_key= together"),
    ({"state": lambda cfg: None, "state_key": "free_delta"}, None, ValueError, "state_key 'free_delta' is another"),
    ({"defaults": ["fgsm_alpha"]}, None, TypeError, "defaults= maps train.py flag names to values"),
    ({"recipes": {"pgd10": methods.Recipe(())}}, None, ValueError, "recipe name 'pgd10' is taken"),
    ({"recipes": {"Toy": methods.Recipe(())}}, None, ValueError, "recipe name 'Toy'"),
    ({"recipes": {"toy": ("--attack=fgsm",)}}, None, TypeError, "must be a methods.Recipe"),
    ({}, "Toy", TypeError, "rows= is a list of labels"),
])
def test_register_says_in_one_line_what_is_wrong_and_registers_nothing(fields, rows, error, fragment):
    before = methods.snapshot()
    with pytest.raises(error) as exc:
        methods.register(methods.Method(**{**GOOD, **fields}), rows=rows)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert methods.snapshot() == before


# An entry's train.py flags, which config.py checks (register() cannot: config.py imports methods.py)
FLAG_PROBLEMS = [
    ({"defaults": {"fgsm_alpah": 1.0}}, None, "method 'toy': defaults= names ['fgsm_alpah'], which are no train.py"),
    ({"recipes": {"toy": methods.Recipe(("--attack=fgsm", "--attack_init=zero"))}}, None,
     "method 'toy': recipe 'toy' does not select it; add --method=toy"),
    ({"recipes": {"toy": methods.Recipe(("--attack=fgsm3", "--method=toy"))}}, None,
     "method 'toy': recipe 'toy': its flags are not train.py's (argument --attack: invalid choice"),
    ({"recipes": {"toy": methods.Recipe(("--method=toy",), lambda eps, dataset, model: 1 / 0)}}, None,
     "method 'toy': recipe 'toy': ZeroDivisionError: division by zero"),
    ({"label": lambda cfg: "Toy"}, ["Toy (other)"], "recipe 'toy' trains runs labelled 'Toy', which is not one of"),
]


@pytest.mark.parametrize("fields, rows, fragment", FLAG_PROBLEMS)
def test_config_names_an_entry_whose_flags_are_not_train_py_s(fields, rows, fragment):
    methods.register(methods.Method(**{**GOOD, **fields}), rows=rows)  # register() cannot tell
    problem = config.registry_problem()
    assert fragment in problem and "\n" not in problem
    with pytest.raises(SystemExit) as exc:  # train.py's parse stops on it, in one line
        config.parse_config(TINY)
    assert exc.value.code == 2
    methods.unregister("toy")
    assert config.registry_problem() is None


@pytest.mark.parametrize("fields, rows, fragment", FLAG_PROBLEMS[:2])
def test_a_methods_file_whose_flags_are_not_train_py_s_registers_nothing(fields, rows, fragment, tmp_path, cli):
    text = ("import methods\n"
            f"methods.register(methods.Method(name='toy', label={fields.get('label', 'Toy')!r}, passes='2', "
            "perturb=methods.perturb_fgsm, "
            f"defaults={fields.get('defaults', {})!r}, recipes={{'toy': methods.Recipe("
            f"{fields.get('recipes', GOOD['recipes'])['toy'].words!r})}}))\n")
    path = write(tmp_path / "bad.py", text)
    before = methods.snapshot()
    with pytest.raises(ValueError) as exc:
        config.load_methods(path)
    assert str(exc.value).startswith(f"methods file {path}: ") and fragment in str(exc.value)
    assert methods.snapshot() == before
    out = cli("sweep.py", "--methods_file", path, "list")
    assert out.code == 2 and fragment in out.err and out.out == ""
    assert methods.snapshot() == before


def test_register_adds_the_rows_and_refuses_a_taken_name_unless_replacing():
    methods.register(methods.Method(**GOOD))
    methods.register(methods.Method(**GOOD_REG), rows=["FGSM + Toy", "PGD-10 + Toy"])
    assert methods.ROW_ORDER[-3:] == ["Toy", "FGSM + Toy", "PGD-10 + Toy"]
    with pytest.raises(ValueError, match="a method named 'toy' is already registered"):
        methods.register(methods.Method(**GOOD))
    methods.register(methods.Method(**{**GOOD, "label": "Toy 2"}), replace=True)
    assert methods.REGISTRY["toy"].label == "Toy 2" and "Toy" not in methods.ROW_ORDER
    assert list(methods.REGISTRY)[-2:] == ["toyreg", "toy"]
    cfg, _ = config.parse_config(methods.flags("toy", 8, "digits"))
    assert report.method_name(config.record(cfg)) == "Toy 2"
    methods.unregister("toy")
    methods.unregister("toyreg")
    assert "Toy 2" not in methods.ROW_ORDER and "FGSM + Toy" not in methods.ROW_ORDER


def test_every_built_in_entry_passes_the_checks_of_register_and_of_config():
    for m in list(methods.REGISTRY.values()):
        assert config.entry_problem(m) is None, m.name
        copy = dataclasses.replace(m, name=f"copy_{m.name}", recipes={},
                                   state_key=m.state_key and f"copy_{m.state_key}")
        methods.register(copy, rows=[f"copy of {m.name}"])
        methods.unregister(copy.name)


def test_a_regulariser_that_does_not_read_grad1_needs_no_start_grad():
    methods.register(methods.Method(**{**GOOD_REG, "regularise": no_grad1, "start_grad": None}), rows=["x + Toy"])
    methods.unregister("toyreg")


# ------------------------------------------------------------------------------------ the file
def test_load_file_names_the_file_and_the_line_and_registers_nothing(tmp_path):
    before = methods.snapshot()
    cases = {
        "missing.py": (None, "No such file or directory"),
        "syntax.py": ("import methods\nx = (\n", "line 2: SyntaxError"),
        "raises.py": ("import methods\n\nraise RuntimeError('no GPU here')\n", "line 3: RuntimeError: no GPU here"),
        "empty.py": ("import methods\n", "it registers no method"),
        "bad.py": ("import methods\nimport utils\n" + "methods.register(methods.Method('ok', 'OK', '2', "
                   "perturb=methods.perturb_fgsm))\nmethods.register(methods.Method('bad', 'Bad', '?', "
                   "perturb=methods.perturb_fgsm))\n", "line 4: method 'bad': passes='?'"),
    }
    for name, (text, fragment) in cases.items():
        path = str(tmp_path / name) if text is None else write(tmp_path / name, text)
        with pytest.raises(ValueError) as exc:
            methods.load_file(path)
        assert str(exc.value).startswith(f"methods file {path}") and fragment in str(exc.value), name
        assert "\n" not in str(exc.value)
        assert methods.snapshot() == before, name  # 'ok' of bad.py is taken back too


def test_a_file_is_run_once_per_content_and_a_changed_one_replaces_its_methods(tmp_path):
    path = write(tmp_path / "m.py", "import methods\nmethods.register(methods.Method('once', 'Once', '2', "
                 "perturb=methods.perturb_fgsm))\n")
    digest = methods.load_file(path)
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest() == methods.loaded_hash(path)
    assert methods.load_file(path) == digest  # not run again: no 'already registered'
    write(path, open(path).read().replace("'Once'", "'Twice'"))
    assert methods.load_file(path) != digest and methods.REGISTRY["once"].label == "Twice"
    assert "Once" not in methods.ROW_ORDER


# --------------------------------------------------------------------------------------- train.py
def test_config_json_records_the_file_and_its_hash(trained):
    path, run_dir, _ = trained
    settings = json.load(open(os.path.join(run_dir, "config.json")))
    assert settings["methods_file"] == path and os.path.isabs(path)
    assert settings["methods_file_sha256"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert os.path.basename(run_dir).endswith("_fgsm2x_seed0")


def test_a_run_without_the_flag_records_nothing_of_it(tiny_run):
    assert not {"methods_file", "methods_file_sha256"} & set(tiny_run("--attack", "fgsm").config)


def test_the_flag_works_from_an_argument_file_and_a_bad_file_is_one_line(tmp_path, cli, trained):
    path = trained[0]
    args = write(tmp_path / "x.args", f"--methods_file {path}  # the toy methods\n--method fgsm2x\n")
    cfg, _ = config.parse_config(TINY + ["--attack", "fgsm", "--attack_init", "zero", f"@{args}"])
    assert cfg.method == "fgsm2x" and cfg.methods_file == path
    bad = write(tmp_path / "bad.py", "import methods\nmethods.register(methods.Method('x y', 'X', '2'))\n")
    for file, fragment in ((tmp_path / "nope.py", "No such file"), (bad, "line 2: method name 'x y'")):
        out = cli("train.py", *TINY, "--methods_file", file, "--out_dir", tmp_path / "runs")
        assert out.code == 2 and fragment in one_line(out.err) and out.err.startswith("train.py: error: methods file")
    out = cli("train.py", *TINY, "--methods_f", path, "--out_dir", tmp_path / "runs")
    assert out.code == 2 and "give --methods_file in full" in one_line(out.err)
    assert not (tmp_path / "runs").exists()


def test_without_the_file_its_method_is_not_a_choice(cli, tmp_path):
    out = cli("train.py", *TINY, *FGSM2X, "--out_dir", tmp_path)
    assert out.code == 2 and "invalid choice: 'fgsm2x'" in one_line(out.err)


def test_resuming_with_a_changed_file_is_refused(trained, tmp_path, cli):
    path, run_dir, argv = trained
    copy = shutil.copytree(run_dir, tmp_path / "runs" / os.path.basename(run_dir))
    os.remove(copy / "final.json")  # interrupted after its last epoch: resume.pt is there
    changed = write(tmp_path / "fgsm2x.py", guide_file() + "# another version\n")
    edit_json(str(copy / "config.json"), methods_file=changed)
    before = snapshot(copy)
    argv = [a if a != path else changed for a in argv]
    out = cli("train.py", *argv[:-1], tmp_path / "runs")
    assert out.code == 2 and "has changed since a run recorded it" in one_line(out.err)
    assert snapshot(copy) == before


# ------------------------------------------------------------------------- report.py, eval.py, listing
def test_report_labels_the_run_from_its_recorded_file(trained, capsys):
    code, out, err = report_main(capsys, os.path.dirname(trained[1]), "--out", os.path.dirname(trained[1]) + "_rep")
    assert code == 0 and "| FGSM (2x step) | 2 |" in out and "warning" not in err


def test_report_names_a_run_whose_file_is_missing_and_does_not_mislabel_it(trained, tmp_path, capsys):
    run = copy_run(trained[1], tmp_path, str(tmp_path / "moved.py"))
    code, out, err = report_main(capsys, str(tmp_path / "runs"), "--out", str(tmp_path / "rep"))
    lines = err.strip().splitlines()
    assert lines[0] == (f"report.py: warning: the methods file {tmp_path / 'moved.py'} that a run's config.json "
                        "names is missing; restore it, or give --methods_file")
    assert lines[1].startswith(f"report.py: warning: {os.path.basename(run)} is not counted: its method 'fgsm2x'")
    assert "## Methods not available (not counted)" in out and "| FGSM |" not in out and "FGSM (2x" not in out
    assert code == 1  # no group to report
    # the same flag loads it
    code, out, _ = report_main(capsys, str(tmp_path / "runs"), "--out", str(tmp_path / "rep"),
                               "--methods_file", trained[0])
    assert code == 0 and "| FGSM (2x step) | 2 |" in out
    code, _, err = report_main(capsys, str(tmp_path / "runs"), "--methods_file", str(tmp_path / "nope.py"))
    assert code == 2 and "No such file" in one_line(err)


def test_report_warns_when_the_file_has_changed(trained, tmp_path, capsys):
    changed = write(tmp_path / "fgsm2x.py", guide_file() + "# another version\n")
    copy_run(trained[1], tmp_path, changed)
    code, out, err = report_main(capsys, str(tmp_path / "runs"), "--out", str(tmp_path / "rep"))
    assert code == 0 and "| FGSM (2x step) | 2 |" in out
    assert "has changed since a run recorded it (sha256 " in one_line(err)


def test_eval_warns_about_a_missing_file_and_evaluates(trained, tmp_path, capsys):
    run = copy_run(trained[1], tmp_path, str(tmp_path / "moved.py"))
    code, out, err = eval_main(capsys, "--model_path", os.path.join(run, "model.pth"))
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["n_eval"] == 8
    assert [line for line in err.splitlines() if "warning" in line] == [
        f"eval.py: warning: the methods file {tmp_path / 'moved.py'} that a run's config.json names is missing; "
        "restore it, or give --methods_file"]
    code, _, err = eval_main(capsys, "--model_path", os.path.join(run, "model.pth"), "--methods_file",
                             str(tmp_path / "nope.py"))
    assert code == 2 and "No such file" in one_line(err)


def test_sweep_py_lists_the_file_s_recipes(trained, cli):
    out = cli("sweep.py", "--methods_file", trained[0], "list")
    assert out.code == 0 and out.out.split()[-2:] == ["fgsm2x", "gradnorm"]
    out = cli("sweep.py", "--methods_file", trained[0], "grid", "--dataset", "digits", "--methods", "gradnorm",
              "--eps", "8")
    assert out.out.strip() == "gradnorm 8 --attack=fgsm --attack_init=zero --method=gradnorm"
    assert cli("sweep.py", "--methods_file", "/nonexistent/m.py", "list").code == 2


def test_the_guide_s_regulariser_gets_its_first_gradient_under_pgd(trained):
    methods.load_file(trained[0])
    cfg, _ = config.parse_config(TINY + ["--attack", "pgd", "--pgd_train_n_iters", "1", "--method", "gradnorm"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    stats = train.Stats(torch.device("cpu"))
    train.train_step(model, None, None, x, y, cfg, train.StepState(), stats, update=False)
    assert stats.means()["train_reg"] > 0 and stats.means()["grad_norm_x"] > 0


@pytest.mark.slow
def test_the_sweeps_pass_methods_file_relative_to_where_they_start(tmp_path):
    # sh/commands.sh's methods.py call and a train.py command, with `python` a shell function that
    # prints its arguments (sweep.py --methods_file itself is tested above, in-process)
    script = (f"cd {ROOT} && source sh/commands.sh && python() {{ echo \"python $*\"; }} && sweep_py list --paper"
              " && EXTRA_ARGS=' --seed=0' && emit --dataset=cifar10 --method=fgsm2x")
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**os.environ, "METHODS_FILE": "mine.py"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    flag = f"--methods_file={tmp_path / 'mine.py'}"
    assert out.stdout.splitlines() == [f"python sweep.py {flag} list --paper",
                                       f"python train.py {flag} --dataset=cifar10 --method=fgsm2x --seed=0"]
    plain = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "METHODS_FILE"})
    assert plain.stdout.splitlines() == ["python sweep.py list --paper",
                                         "python train.py --dataset=cifar10 --method=fgsm2x --seed=0"]


@pytest.mark.slow
def test_the_guide_s_file_runs_from_outside_the_repository(tmp_path):
    assert not str(tmp_path).startswith(ROOT)
    path = write(tmp_path / "fgsm2x.py", guide_file())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    trained = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--methods_file", "fgsm2x.py", *TINY,
                              *FGSM2X, "--out_dir", "runs"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    shown = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "runs", "--out", "rep"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "warning" not in shown.stderr, shown.stderr
    methods.load_file(path)
    label, passes = methods.REGISTRY["fgsm2x"].label, methods.REGISTRY["fgsm2x"].passes
    assert f"| {label} | {passes} |" in shown.stdout
    assert f"{label}" in open(tmp_path / "rep" / "report.csv").read()
