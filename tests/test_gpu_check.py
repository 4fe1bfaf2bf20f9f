"""gpu_check.py: the CPU rehearsal runs every part and passes; the agreement part fails when GradAlign's
double backward is cut on the fp16 path (which the whole update's cosine does not see); the report is
written after each part; the recipe and the sweep settings it uses are those of the README and sh/."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

import config
import gpu_check
import precision
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, *argv: str) -> tuple[int, dict]:
    out = tmp_path / "check.json"
    code = gpu_check.main(["--device", "cpu", "--threads", "1", "--out", str(out), *argv])
    return code, json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_part_and_passes(tmp_path, capsys):
    code, report = run(tmp_path)
    assert code == 0 and report["passed"] is True, capsys.readouterr().out
    assert set(report["parts"]) == set(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["passed"] is True and part["checks"], name
    agreement = report["parts"]["agreement"]
    assert [r["model"] for r in agreement["models"]] == list(gpu_check.CPU_SIZES.agreement_models)
    for r in agreement["models"]:
        assert r["cos_reg_param_grad"] >= gpu_check.AGREEMENT_LIMITS["cos_reg_param_grad_min"]
        assert 0 < r["reg_share_of_update_norm"] < 1
    rows = report["parts"]["underflow"]["models"]["cnn_bn"]
    assert [round(r["median_margin_nats"]) for r in rows] == [10, 15, 20, 25]
    assert any(r["fp16_scaled"] < r["fp16_unscaled"] for r in rows)  # eval mode shows the underflow
    assert all(r["bf16"] <= r["fp16_scaled"] for r in rows)
    cost = report["parts"]["cost"]
    assert set(cost["epochs"]) == set(gpu_check.COST_METHODS) == set(cost["projection"])
    for method, p in cost["projection"].items():
        e = cost["epochs"][method]
        assert e["steps"] == gpu_check.CPU_SIZES.cost_images // gpu_check.CPU_SIZES.cost_batch
        assert p["periodic_evaluations"] == 59 and p["final_evaluations"] == 2
        assert p["total_minutes"] * 60 == pytest.approx(
            30 * 390 * e["seconds_per_epoch"] / e["steps"] + 59 * cost["periodic_evaluation"]["seconds"]
            + 30 * e["resume_save_s"] + 2 * cost["final_evaluation"]["pgd_50_10_s"])
        assert e["peak_allocated_mib"] is None  # CPU
    final = cost["final_evaluation"]
    assert final["robust_acc_at_eps_0"] == 1.0  # every example stays in the batch: the most passes
    real = report["parts"]["real_run"]
    assert real["reference_source"].startswith("run here") and "--half_prec" in real["recipe"]
    assert set(real["fp16"]["last"]) >= {"clean_acc", "pgd_acc", "cos_x_eta"}


def cut_double_backward(monkeypatch) -> None:
    """grad2 on the fp16 path built without create_graph: GradAlign's regulariser then reaches no weight."""
    real = utils.input_grad

    def input_grad(model, x, y, delta, *, clamp_rule=None, create_graph=False):
        if isinstance(model, precision.Autocast):
            create_graph = False
        return real(model, x, y, delta, clamp_rule=clamp_rule, create_graph=create_graph)
    monkeypatch.setattr(utils, "input_grad", input_grad)


def test_a_cut_double_backward_fails_the_agreement_part(tmp_path, monkeypatch):
    code, report = run(tmp_path, "--parts", "agreement")
    assert code == 0 and report["passed"] is True
    cut_double_backward(monkeypatch)
    code, report = run(tmp_path, "--parts", "agreement")
    assert code == gpu_check.EXIT_FAILED and report["passed"] is False
    failed = {(c["model"], c["check"]) for c in report["parts"]["agreement"]["checks"] if not c["passed"]}
    for model in gpu_check.CPU_SIZES.agreement_models:
        assert (model, "cos_reg_param_grad") in failed and (model, "reg_param_grad_norm_ratio") in failed
    for r in report["parts"]["agreement"]["models"]:
        assert r["cos_update"] > 0.999  # what the whole update's cosine would have said
        assert r["cos_grad2"] > 0.99  # the values agree; only the graph is gone


def test_the_report_is_written_after_each_part_and_a_crash_fails_only_its_part(tmp_path, monkeypatch):
    def broken(sizes, device):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(gpu_check, "part_underflow", broken)
    code, report = run(tmp_path, "--parts", "agreement", "underflow")
    assert code == gpu_check.EXIT_FAILED
    assert report["parts"]["agreement"]["passed"] is True
    assert report["parts"]["underflow"] == {**report["parts"]["underflow"], "passed": False,
                                            "error": "RuntimeError: out of memory"}


def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "check.json"
    for argv in (["--parts", "nope"], ["--cpu_reference", str(tmp_path / "missing.json")], ["--threads", "-1"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.main(["--device", "cpu", "--out", str(out), *argv])
        assert exc.value.code == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not out.exists()


def test_the_real_run_is_the_readme_quick_start(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert re.search(r"^python train\.py @recipes/digits_gradalign\.args$", readme, re.MULTILINE)
    assert os.path.join(ROOT, "recipes", "digits_gradalign.args") == gpu_check.QUICK_START
    monkeypatch.chdir(tmp_path)  # the included recipe is found from any working directory
    words = gpu_check.recipe_words(gpu_check.QUICK_START)
    monkeypatch.chdir(ROOT)
    assert config.parse_config(words)[0] == config.parse_config(["@recipes/digits_gradalign.args"])[0]
    assert words[-2:] == ["--grad_align_cos_lambda", "1"] and "--dataset" in words


def test_the_projection_uses_the_cifar10_sweep_settings():
    with open(os.path.join(ROOT, "sh", "exps_diff_eps_cifar10.sh")) as f:
        common = re.search(r'^COMMON="([^"]*)"', f.read(), re.MULTILINE).group(1)
    flags = dict(w.lstrip("-").split("=", 1) if "=" in w else (w.lstrip("-"), True) for w in common.split())
    sweep = gpu_check.SWEEP
    assert int(flags["eval_iter_freq"]) == sweep["eval_iter_freq"]
    assert int(flags["batch_size_eval"]) == sweep["batch_size_eval"]
    assert int(flags["n_final_eval"]) == sweep["n_final_eval"]
    assert sweep["final_evaluations"] == (2 if flags.get("eval_early_stopped_model") else 1)
    assert "n_eval_every_k_iter" not in flags and "batch_size" not in flags  # train.py's defaults then
    defaults = config.defaults()
    assert (defaults["n_eval_every_k_iter"], defaults["batch_size"]) == (sweep["n_eval_every_k_iter"],
                                                                         sweep["batch_size"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_agreement_part_passes_on_cuda(tmp_path):
    """train.py's float16 training path on the GPU (GradScaler, scaled input gradients, fp32 BatchNorm)
    against fp32: GradAlign's own parameter gradient on ResNet-18 and the CNNs."""
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cuda", "--parts", "agreement", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["parts"]["agreement"]["models"]
    assert [r["model"] for r in rows] == list(gpu_check.GPU_SIZES.agreement_models)
