"""No silent CPU fallback: --device cuda without usable CUDA exits 2 with one line naming the cause
(train.py, eval.py, bench.py, gpu_check.py; this machine has no GPU, and the causes torch reports
are simulated); --device auto says first which device and precision it took; config.json records
the resolved half-precision dtype; metrics.jsonl counts fp16 input-gradient passes redone in fp32."""
from __future__ import annotations

import json
import os

import pytest
import torch

import bench
import eval as eval_py
import gpu_check
import models
import rundir
import train
import utils
from tests.fixtures import TINY

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


def tiny(tmp_path, *extra: str) -> list[str]:
    return [a for a in TINY if a not in ("--device", "cpu")] + ["--out_dir", str(tmp_path / "runs"), *extra]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@NO_CUDA
def test_train_and_eval_with_device_cuda_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    assert train.main(tiny(tmp_path, "--device", "cuda")) == 2
    err = capsys.readouterr()
    line = one_line(err.err)
    assert err.out == "" and "--device cuda: CUDA is not usable" in line and torch.__version__ in line
    assert not (tmp_path / "runs").exists()
    checkpoint = tmp_path / "m.pth"
    torch.save(models.build_model("cnn", 10, (1, 8, 8)).state_dict(), checkpoint)
    code = eval_py.main(["--model_path", str(checkpoint), "--dataset", "digits", "--model", "cnn", "--device", "cuda"])
    err = capsys.readouterr()
    assert code == 2 and err.out == "" and "CUDA is not usable" in one_line(err.err)


@NO_CUDA
@pytest.mark.parametrize("tool", [bench, gpu_check])
def test_bench_and_gpu_check_with_device_cuda_exit_2_with_one_line(tmp_path, capsys, tool):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exc:
        tool.main(["--device", "cuda", "--out", str(out)])
    assert exc.value.code == 2
    assert "CUDA is not usable" in one_line(capsys.readouterr().err)
    assert not out.exists()


def without_cuda(monkeypatch, build: str | None, init_error: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", build)

    def init():
        if init_error is not None:
            raise RuntimeError(init_error)
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_the_cause_names_a_driver_too_old_for_the_build_with_both_versions(monkeypatch):
    without_cuda(monkeypatch, "13.0", "The NVIDIA driver on your system is too old (found version 12080). "
                                      "Please update your GPU driver")
    with pytest.raises(ValueError) as exc:
        utils.resolve_device("cuda")
    message = str(exc.value)
    assert "driver is too old" in message and "CUDA 12.8" in message and "CUDA 13.0" in message
    assert "\n" not in message


@pytest.mark.parametrize("build, init_error, fragment", [
    (None, None, "CPU-only build"),
    ("13.0", "Found no NVIDIA driver on your system.", "no NVIDIA GPU or driver found"),
    ("13.0", None, "no NVIDIA GPU or driver found"),
    ("13.0", "CUDA error: unknown error\nmore", "CUDA failed to start"),
])
def test_the_cause_of_other_failures(monkeypatch, build, init_error, fragment):
    without_cuda(monkeypatch, build, init_error)
    problem = utils.cuda_problem()
    assert fragment in problem and "\n" not in problem
    with pytest.raises(ValueError):
        utils.resolve_device("cuda:0")
    assert utils.resolve_device("auto") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("half, dtype", [((), None), (("--half_prec",), "bfloat16"),
                                         (("--half_prec", "--half_prec_dtype", "float16"), "float16")])
def test_device_auto_says_first_what_it_chose_and_config_records_the_resolved_dtype(tmp_path, capsys, half, dtype):
    args = tiny(tmp_path, "--device", "auto", *half)
    assert train.main(args) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("train.py: --device auto chose cpu (CUDA not usable: ")
    precision = "fp32" if dtype is None else f"{dtype} autocast"
    assert first.endswith(f"precision {precision}" + (" with loss scaling" if dtype == "float16" else ""))
    cfg, defaults = train.parse_config(args)
    config = rundir.read_config(os.path.join(str(tmp_path / "runs"), train.run_name(cfg, defaults)))
    assert config["half_prec_dtype_used"] == dtype


@NO_CUDA
def test_eval_bench_and_gpu_check_say_first_what_auto_chose(tmp_path, capsys):
    checkpoint = tmp_path / "m.pth"
    torch.save(models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict(), checkpoint)
    assert eval_py.main(["--model_path", str(checkpoint), "--dataset", "digits", "--model", "cnn", "--n_filters_cnn",
                         "4", "--n_eval", "8", "--attack_iters", "1", "--n_restarts", "1", "--half_prec"]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines()[0].startswith("eval.py: --device auto chose cpu")
    assert out.err.splitlines()[0].endswith("precision bfloat16 autocast")
    assert json.loads(out.out.splitlines()[-1])["fp32_redone_passes"] == 0  # bf16: nothing is scaled
    bench.parse_settings(["--quick"])
    assert capsys.readouterr().out.splitlines()[0].startswith("bench.py: --device auto chose cpu")
    assert gpu_check.main(["--device", "auto", "--parts", "agreement", "--out", str(tmp_path / "c.json")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("gpu_check.py: --device auto chose cpu") and "float16" in first


def test_an_overflowing_fp16_pass_is_counted_once_and_the_count_resets():
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    huge = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    fwd = utils.Autocast(model, "cpu", torch.float16, scaler=huge)
    utils.input_grad(fwd, x, y, torch.zeros_like(x))
    assert utils.take_fp32_redos(fwd) == 1 and utils.take_fp32_redos(fwd) == 0
    utils.input_grad(utils.Autocast(model, "cpu", torch.float16), x, y, torch.zeros_like(x))
    assert utils.take_fp32_redos(model) == 0  # not a wrapper: nothing to count


def test_metrics_count_the_fp16_passes_redone_in_fp32_since_the_last_record(tmp_path, monkeypatch):
    """Every scaled pass overflows (a scale of 1e30): each record must count exactly the scaled passes
    (training and periodic evaluation) made since the previous record."""
    monkeypatch.setattr(utils.Autocast, "input_grad_scale", lambda self, b, device: torch.tensor(1e30))
    scaled, at_record = [0], []
    summed = utils._summed_ce_grad

    def spy(model, x, y, delta, clamp_rule, create_graph, scale):
        scaled[0] += scale is not None
        return summed(model, x, y, delta, clamp_rule, create_graph, scale)
    append = rundir.append_jsonl

    def record(path, row):
        at_record.append(scaled[0])
        append(path, row)
    monkeypatch.setattr(utils, "_summed_ce_grad", spy)
    monkeypatch.setattr(rundir, "append_jsonl", record)
    args = TINY + ["--out_dir", str(tmp_path), "--attack", "fgsm", "--half_prec", "--half_prec_dtype", "float16"]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    rows = rundir.read_jsonl(os.path.join(str(tmp_path), train.run_name(cfg, defaults), "metrics.jsonl"))
    counts = [r["fp32_redone_passes"] for r in rows]
    assert counts == [b - a for a, b in zip([0] + at_record, at_record)] and min(counts) > 0


def test_fp32_runs_record_no_redo(tmp_path):
    args = TINY + ["--out_dir", str(tmp_path), "--attack", "fgsm"]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    rows = rundir.read_jsonl(os.path.join(str(tmp_path), train.run_name(cfg, defaults), "metrics.jsonl"))
    assert [r["fp32_redone_passes"] for r in rows] == [0] * len(rows)
    assert json.loads(open(os.path.join(str(tmp_path), train.run_name(cfg, defaults), "config.json")).read())[
        "half_prec_dtype_used"] is None
