"""Flags and bad input of every entry point (train.py, eval.py, report.py, launch.py, bench.py,
gpu_check.py): a one-line error naming the problem and the fix, exit code 2, nothing written.
--device cuda without usable CUDA exits 2 naming the cause (this machine has no GPU: the causes torch
reports are simulated); --device auto says first which device and precision it took.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil

import numpy as np
import pytest
import torch

import bench
import config
import eval as eval_py
import gpu_check
import launch
import models
import precision
import rundir
import train
import utils
from tests.fixtures import (
    FGSM_RUN,
    ROOT,
    TINY,
    edit_json,
    eval_main,
    one_line,
    report_main,
    snapshot,
    write_cifar10,
    write_svhn,
)


# --------------------------------------------------------------------------------------------- eval.py
def checkpoint_beside_config(finished: str, folder, weights) -> str:
    """folder/model.pth holding `weights`, beside a copy of the run's config.json."""
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(finished, "config.json"), folder)
    path = os.path.join(str(folder), "model.pth")
    torch.save(weights, path)
    return path


def test_5_eval_refuses_nonfinite_weights(finished, tmp_path, capsys):
    state = torch.load(os.path.join(finished, "model.pth"), weights_only=True)
    state["last"]["_model.0.weight"][0, 0, 0, 0] = float("nan")
    path = checkpoint_beside_config(finished, tmp_path / "nan", state)
    before = snapshot(tmp_path)
    code, out, err = eval_main(capsys, "--model_path", path)
    assert code == 2 and out == ""
    line = one_line(err)
    assert "NaN or inf" in line and "_model.0.weight" in line and "'last'" in line and "retrain" in line
    assert snapshot(tmp_path) == before


def test_6_eval_early_stopped_model_on_a_bare_state_dict_names_the_fix(finished, tmp_path, capsys):
    last = torch.load(os.path.join(finished, "model.pth"), weights_only=True)["last"]
    path = checkpoint_beside_config(finished, tmp_path / "bare", last)
    before = snapshot(tmp_path)
    code, out, err = eval_main(capsys, "--model_path", path, "--early_stopped_model")
    assert code == 2 and out == ""
    assert "bare state_dict" in one_line(err) and "without --early_stopped_model" in err
    assert snapshot(tmp_path) == before
    assert eval_main(capsys, "--model_path", path)[0] == 0  # its one set of weights, as 'last'


@pytest.mark.parametrize("config", [{"dataset": "imagenet"}, {"model": "vit"}, {"n_filters_cnn": "four"},
                                    {"eps": 1000}, "[1, 2]", '{"dataset": "dig'])
def test_19_eval_with_a_foreign_config_json_beside_the_checkpoint(finished, tmp_path, capsys, config):
    folder = tmp_path / "foreign"
    path = checkpoint_beside_config(finished, folder, torch.load(os.path.join(finished, "model.pth"),
                                                                 weights_only=True))
    if isinstance(config, dict):
        edit_json(str(folder / "config.json"), **config)
    else:
        (folder / "config.json").write_text(config)
    before = snapshot(tmp_path)
    code, out, err = eval_main(capsys, "--model_path", path)
    assert code == 2 and out == ""
    line = one_line(err)
    assert str(folder / "config.json") in line and "explicitly" in line
    if isinstance(config, dict):
        (name, value), = config.items()
        assert f"its {name} {value!r}" in line and f"--{name}" in line
    assert snapshot(tmp_path) == before


def test_23_eval_on_a_resume_pt_says_what_it_is_without_torch_advice(finished, tmp_path, capsys):
    path = tmp_path / "resume.pt"  # as train.py's: weights plus Python objects (numpy's RNG state)
    torch.save({"model": torch.load(os.path.join(finished, "model.pth"), weights_only=True)["last"],
                "rng": {"numpy": np.random.get_state()}}, path)
    code, out, err = eval_main(capsys, "--model_path", str(path), "--dataset", "digits", "--model", "cnn")
    assert code == 2 and out == ""
    line = one_line(err)
    assert "resume.pt" in line and "model.pth" in line
    assert "\x1b" not in line and "trust" not in line and "weights_only" not in line


# ------------------------------------------------------------------------------------------- report.py
def test_11_report_on_a_missing_root_or_curves_dir_writes_nothing(finished, tmp_path, capsys):
    out_dir = tmp_path / "out"
    for args, expected in (([str(tmp_path / "nope")], f"root {tmp_path / 'nope'} does not exist; check the path"),
                           (["--curves", str(tmp_path / "nope")], "no such run directory"),
                           (["--curves", str(tmp_path)], "it has no metrics.jsonl"),
                           ([finished, "--curves", finished, str(tmp_path / "nope")], "no such run directory")):
        code, out, err = report_main(capsys, *args, "--out", str(out_dir))
        assert code == 2 and out == ""
        assert one_line(err).startswith("report.py: error: ") and expected in err
        assert not out_dir.exists()


def test_17_report_out_pointing_at_a_file(finished, tmp_path, capsys):
    target = tmp_path / "report.md"
    target.write_text("keep me")
    code, out, err = report_main(capsys, os.path.dirname(finished), "--out", str(target))
    assert code == 2 and out == ""
    assert one_line(err) == f"report.py: error: --out {target} is a file, not a folder; give a folder"
    assert target.read_text() == "keep me"


# ------------------------------------------------------------------------------------------- launch.py
def train_command(out_dir, *extra: str) -> str:
    return shlex.join(["python", "train.py", *TINY, *FGSM_RUN, "--out_dir", str(out_dir), *extra])


@pytest.mark.parametrize("case", ["quote", "no file", "log_dir is a file", "long name"])
def test_18_launch_refuses_bad_input_before_running_anything(tmp_path, capsys, monkeypatch, case):
    out_dir = tmp_path / "runs"
    lines = [train_command(out_dir, "--seed", "0"), train_command(out_dir, "--seed", "1")]
    args = []
    if case == "quote":
        lines.append('python train.py --out_dir "runs')
        expected = "launch.py: error: line 3 of the commands: no closing quotation"
    elif case == "no file":
        args = [str(tmp_path / "missing.txt")]
        expected = f"launch.py: error: cannot read the commands file {tmp_path / 'missing.txt'} (No such file"
    elif case == "log_dir is a file":
        (tmp_path / "logs").write_text("keep me")
        expected = f"launch.py: error: --log_dir {tmp_path / 'logs'} is a file, not a folder; give a folder"
    else:
        real = launch.run_dir_of
        monkeypatch.setattr(launch, "run_dir_of", lambda a: real(a) + ("x" * 300 if a[-2:] == ["--seed", "1"] else ""))
        expected = "launch.py: error: command 2: its run name has 4"
    before = snapshot(tmp_path)
    commands = tmp_path / "commands.txt"
    commands.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    code = launch.main([*(args or [str(commands)]), "--log_dir", str(tmp_path / "logs")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert one_line(err).startswith(expected)
    assert snapshot(tmp_path) == {**before, "commands.txt": commands.read_bytes()}  # no run, no log written
    assert not out_dir.exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--nfgsm_noise_mult", "3"], "--nfgsm_noise_mult needs --attack nfgsm"),
    (["--attack", "nfgsm", "--nfgsm_noise_mult", "-1"], "--nfgsm_noise_mult must be"),
    (["--zerograd_q", "1"], "--zerograd_q must be in [0, 1)"),
    (["--attack", "pgd", "--zerograd_q", "0.3"], "--zerograd_q needs --attack fgsm"),
    (["--zerograd_q", "0.3", "--minibatch_replay", "2"], "--zerograd_q needs"),
    (["--elle_lambda", "-1"], "--elle_lambda must be"),
    (["--elle_adaptive"], "--elle_adaptive needs --elle_lambda"),
    (["--elle_lambda", "10", "--grad_align_cos_lambda", "1"], "use one of them"),
    (["--grad_align_every", "2"], "need --grad_align_cos_lambda"),
    (["--grad_align_grad1", "graph"], "need --grad_align_cos_lambda"),
    (["--grad_align_cos_lambda", "1", "--grad_align_every", "0"], "--grad_align_every must be"),
    (["--grad_align_cos_lambda", "1", "--grad_align_fd", "-0.1"], "--grad_align_fd must be"),
    (["--grad_align_grad1", "both"], "invalid choice"),
])
def test_bad_method_flags_are_one_line_exit_2(capsys, flags, fragment):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(TINY + flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_grad_align_fd_is_refused_in_half_precision():
    assert utils.refuse_fd_in_half_precision(0.001, True).startswith("--grad_align_fd needs fp32")
    assert utils.refuse_fd_in_half_precision(0.001, False) is None
    assert utils.refuse_fd_in_half_precision(0.0, True) is None


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


# ------------------------------------------------------------------------------- argument files
def test_an_argument_file_gives_several_flags_per_line_with_comments_and_later_flags_override(tmp_path):
    path = tmp_path / "x.args"
    path.write_text("# GradAlign on digits\n--dataset digits --model cnn   # the small CNN\n\n"
                    "--eps 8\n--grad_align_cos_lambda 0.5\n")
    cfg, _ = config.parse_config([f"@{path}", "--eps", "12"])
    assert (cfg.dataset, cfg.model, cfg.grad_align_cos_lambda, cfg.eps) == ("digits", "cnn", 0.5, 12)


def test_a_nested_argument_file_is_read_from_the_folder_of_the_file_that_names_it(tmp_path, monkeypatch):
    here, _ = config.parse_config(["@recipes/digits_gradalign.args"])
    monkeypatch.chdir(tmp_path)  # elsewhere: the recipe's @digits_demo.args is still found beside it
    elsewhere, _ = config.parse_config([f"@{ROOT}/recipes/digits_gradalign.args"])
    assert elsewhere == here and (here.dataset, here.grad_align_cos_lambda) == ("digits", 1)


@pytest.mark.parametrize("case", ["missing", "loop", "quote"])
def test_a_bad_nested_argument_file_names_the_chain_in_one_line(tmp_path, cli, case):
    (tmp_path / "sub").mkdir()
    (tmp_path / "outer.args").write_text("--eps 4\n@sub/inner.args\n")
    inner = {"missing": "@nowhere.args\n", "loop": "@../outer.args\n", "quote": "--data_dir 'x\n"}[case]
    (tmp_path / "sub" / "inner.args").write_text(inner)
    proc = cli("train.py", f"@{tmp_path}/outer.args", "--out_dir", tmp_path / "runs")
    outer, nested = f"{tmp_path}/outer.args", f"{tmp_path}/sub/inner.args"
    expected = {
        "missing": f"cannot read the argument file {tmp_path}/sub/nowhere.args (No such file or directory), named "
                   f"in {nested}, named in {outer}; check the path (an @file inside an argument file is read from "
                   "that file's folder)",
        "loop": f"the argument files name each other in a loop ({outer} -> {nested} -> {tmp_path}/sub/../outer.args); "
                "remove the loop",
        "quote": f"the argument file {nested}, named in {outer}: no closing quotation; fix its quoting"}[case]
    assert proc.code == 2 and one_line(proc.err) == f"train.py: error: {expected}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b'{"last": 1}', "truncated"])
def test_bad_checkpoints_give_one_line_exit_2(tmp_path, cli, content):
    path = tmp_path / "model.pth"
    if content == "truncated":
        import models
        torch.save({"last": models.build_model("cnn", 10, (1, 8, 8), 1, 4).state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    proc = cli("eval.py", "--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--model_path", path,
               "--device", "cpu")
    assert proc.code == 2
    assert len(proc.err_lines) == 1 and "Traceback" not in proc.err, proc.err


def test_a_checkpoint_of_another_architecture_names_the_difference(tmp_path, cli):
    import models
    path = tmp_path / "model.pth"
    torch.save({"last": models.build_model("cnn", 10, (1, 8, 8), 1, 8).state_dict()}, path)
    proc = cli("eval.py", "--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--model_path", path,
               "--device", "cpu")
    assert proc.code == 2
    assert "_model.0.weight (8, 1, 3, 3) vs (4, 1, 3, 3)" in proc.err
    assert len(proc.err_lines) == 1


def test_eval_rejects_restarts_without_random_start(cli):
    proc = cli("eval.py", "--dataset", "digits", "--model", "cnn", "--model_path", "x", "--attack_init", "zero",
               "--n_restarts", "10")
    assert proc.code == 2 and "random start" in proc.err and len(proc.err_lines) == 1


# ------------------------------------------------------------------------------- bad input, no writes
def _corrupt_cifar(root):
    write_cifar10(root, [[0, 1]] * 5, [0, 1])
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x04garbage, not a pickle")
    return "cifar10", str(root / "cifar-10-batches-py" / "data_batch_2")


def _truncated_svhn(root):
    write_svhn(root, [1, 2], [1, 2])
    path = root / "train_32x32.mat"
    path.write_bytes(path.read_bytes()[:200])
    return "svhn", str(path)


@pytest.mark.parametrize("damage", [_corrupt_cifar, _truncated_svhn])
def test_an_unreadable_dataset_file_is_named_in_one_line_exit_2_no_run_dir(tmp_path, capsys, damage):
    dataset, path = damage(tmp_path / "data")
    args = ["--dataset", dataset, "--model", "cnn", "--data_dir", str(tmp_path / "data"), "--device", "cpu",
            "--out_dir", str(tmp_path / "runs")]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert path in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("flag", [["--lr_max", "-1"], ["--weight_decay", "-0.1"], ["--lr_max", "nan"]])
def test_values_the_optimiser_rejects_exit_2_before_any_write(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        train.main(TINY + ["--out_dir", str(tmp_path / "runs"), *flag])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag[0] in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "runs")


def test_help_documents_clamp_grad(cli):
    out = cli("train.py", "--help")
    assert out.code == 0
    assert "--clamp_grad" in out.out and "PyTorch 1.4" in " ".join(out.out.split())


@pytest.mark.parametrize("flags, fragment", [
    (["--dataset", "uniform_noise"], "invalid choice"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--model", "lenet"], "invalid choice"),
    (["--attack", "free"], "invalid choice"),
    (["--eps", "-1"], "--eps"),
    (["--eps", "300"], "--eps"),
    (["--fgsm_alpha", "0"], "--fgsm_alpha"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch_size", "0"], "--batch_size"),
    (["--n_final_eval", "0"], "--n_final_eval"),
    (["--n_final_eval", "100000"], "--n_final_eval"),
    (["--n_eval_every_k_iter", "100"], "--n_eval_every_k_iter"),
    (["--model", "resnet18"], "3-channel"),
    (["--device", "cuda"], "CUDA"),
    (["--dataset", "cifar10", "--model", "resnet18", "--data_dir", "/nonexistent/x"], "--download"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, cli, flags, fragment):
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out_dir = tmp_path / "runs"
    proc = cli("train.py", *TINY, "--out_dir", out_dir, *flags)
    assert proc.code == 2, proc.err
    assert len(proc.err_lines) == 1 and fragment in proc.err_lines[0], proc.err
    assert "Traceback" not in proc.err
    assert not out_dir.exists()


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without CUDA")


def tiny(tmp_path, *extra: str) -> list[str]:
    return [a for a in TINY if a not in ("--device", "cpu")] + ["--out_dir", str(tmp_path / "runs"), *extra]


def only_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@NO_CUDA
def test_train_and_eval_with_device_cuda_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    assert train.main(tiny(tmp_path, "--device", "cuda")) == 2
    err = capsys.readouterr()
    line = only_line(err.err)
    assert err.out == "" and "--device cuda: CUDA is not usable" in line and torch.__version__ in line
    assert not (tmp_path / "runs").exists()
    checkpoint = tmp_path / "m.pth"
    torch.save(models.build_model("cnn", 10, (1, 8, 8)).state_dict(), checkpoint)
    code = eval_py.main(["--model_path", str(checkpoint), "--dataset", "digits", "--model", "cnn", "--device", "cuda"])
    err = capsys.readouterr()
    assert code == 2 and err.out == "" and "CUDA is not usable" in only_line(err.err)


@NO_CUDA
@pytest.mark.parametrize("tool", [bench, gpu_check])
def test_bench_and_gpu_check_with_device_cuda_exit_2_with_one_line(tmp_path, capsys, tool):
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exc:
        tool.main(["--device", "cuda", "--out", str(out)])
    assert exc.value.code == 2
    assert "CUDA is not usable" in only_line(capsys.readouterr().err)
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
        precision.resolve_device("cuda")
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
    problem = precision.cuda_problem()
    assert fragment in problem and "\n" not in problem
    with pytest.raises(ValueError):
        precision.resolve_device("cuda:0")
    assert precision.resolve_device("auto") == torch.device("cpu")


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


def test_bad_layout_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(["--channels_last", "maybe"])
    assert exc.value.code == 2 and "--channels_last" in capsys.readouterr().err


def test_half_prec_dtype_without_half_prec_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_config(TINY + ["--half_prec_dtype", "float16"])
    assert exc.value.code == 2 and "--half_prec" in capsys.readouterr().err


# ------------------------------------------------------------------ 12, 13, 21: flags caught up front
@pytest.mark.parametrize("device", ["tpu", "gpu", "mps", "meta", "cuda:x", "cpu:0"])
def test_12_a_device_other_than_cpu_or_cuda_is_one_line_exit_2_nothing_written(tmp_path, cli, device):
    proc = cli("train.py", *TINY, "--device", device, "--out_dir", tmp_path / "runs")
    assert proc.code == 2
    assert one_line(proc.err) == (f"train.py: error: --device {device} is not supported: use auto, cpu, cuda "
                                  "or cuda:N")
    assert not os.path.exists(tmp_path / "runs")
    proc = cli("eval.py", "--model_path", tmp_path / "none.pth", "--device", device, "--dataset", "digits")
    assert proc.code == 2
    assert one_line(proc.err).endswith(f"--device {device} is not supported: use auto, cpu, cuda or cuda:N")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed must be in [0, 2**32 - 1] (got -1)"),
    (["--seed", "4294967296"], "--seed must be in [0, 2**32 - 1] (got 4294967296)"),
    (["--pgd_alpha_train", "nan"], "--pgd_alpha_train must be a finite number (got nan)"),
    (["--lr_max", "inf"], "--lr_max must be a finite number (got inf)"),
    (["--eps=-inf"], "--eps must be a finite number (got -inf)"),
])
def test_13_21_a_seed_out_of_range_or_a_non_finite_number_is_one_line_exit_2(tmp_path, cli, flags, message):
    proc = cli("train.py", *TINY, *flags, "--out_dir", tmp_path / "runs")
    assert proc.code == 2
    assert one_line(proc.err).startswith(f"train.py: error: {message}")
    assert not os.path.exists(tmp_path / "runs")


def test_13_the_largest_seed_trains(tmp_path, cli):
    assert cli("train.py", *TINY, "--epochs", "0", "--seed", str(2**32 - 1), "--out_dir", tmp_path).code == 0


# ------------------------------------------------------ counts that would measure nothing (issue 30)
@pytest.mark.parametrize("tool, flags", [
    ("train.py", ["--attack_iters", "0"]),
    ("train.py", ["--attack", "pgd", "--pgd_train_n_iters", "0"]),
    ("train.py", ["--attack_iters", "-2"]),
    ("eval.py", ["--model_path", "model.pth", "--attack_iters", "0"]),
])
def test_zero_attack_steps_are_refused_in_one_line_exit_2(tmp_path, cli, tool, flags):
    """0 PGD steps make the 'PGD' accuracy the clean one (and early stopping would pick on it)."""
    args = [*TINY, "--out_dir", tmp_path / "runs"] if tool == "train.py" else ["--device", "cpu"]
    proc = cli(tool, *args, *flags)
    name = next(f for f in flags if f.endswith("_iters"))
    assert proc.code == 2
    assert f"argument {name}: must be >= 1 (got " in one_line(proc.err)
    assert os.listdir(tmp_path) == []


def test_eval_refuses_zero_restarts(tmp_path, cli):
    proc = cli("eval.py", "--model_path", tmp_path / "model.pth", "--n_restarts", "0")
    assert proc.code == 2 and "--n_restarts must be >= 1 (got 0)" in one_line(proc.err)


def test_more_training_steps_than_any_run_could_finish_are_refused(tmp_path, cli):
    proc = cli("train.py", *TINY, "--epochs", "100000000000", "--out_dir", tmp_path / "runs")
    assert proc.code == 2
    assert one_line(proc.err) == ("train.py: error: --epochs 100000000000 means 4e+11 training steps, more than any "
                                  "run could finish (10**9: 11 days at 1 ms a step); give fewer epochs (the paper "
                                  "trains 30)")
    assert not (tmp_path / "runs").exists()
    assert config.steps_problem(config.parse_config([*TINY, "--epochs", str((10**9 - 1) // 4)])[0]) is None  # the bound


# Settings whose run name has 272 bytes: every number written with all its digits.
LONG_NAME = ["--dataset", "digits", "--model", "cnn", "--device", "cpu", "--debug", "--epochs", "0",
             "--lr_max", "0.0123456789012345", "--weight_decay", "0.000123456789012345", "--fgsm_alpha",
             "1.2345678901234567", "--pgd_alpha_train", "2.345678901234567", "--n_filters_cnn", "7",
             "--eval_iter_freq", "7", "--n_final_eval", "33", "--batch_size", "127", "--n_eval_every_k_iter", "333",
             "--batch_size_eval", "99", "--grad_align_cos_lambda", "0.123456789012345", "--eps", "7.123456789012345",
             "--seed", "4294967295", "--attack_iters", "3", "--clamp_grad", "half", "--grad_align_fd",
             "0.00123456789012345", "--grad_align_every", "3", "--n_layers", "2", "--minibatch_replay", "2",
             "--lr_peak", "0.35"]


def test_a_run_name_over_255_bytes_is_refused_by_train_and_launch_before_anything_is_written(tmp_path, cli):
    out = tmp_path / "runs"
    proc = cli("train.py", *LONG_NAME, "--out_dir", out)
    assert proc.code == 2
    assert one_line(proc.err) == ("train.py: error: its run name has 272 bytes (digits_cnn_fgsm_random_eps7.1234567890"
                                  "12...), over the 255 a file name may have; leave some of its settings at their "
                                  "defaults")
    (tmp_path / "cmds.txt").write_text(f"python train.py {shlex.join(LONG_NAME)} --out_dir {out}\n")
    proc = cli("launch.py", tmp_path / "cmds.txt", "--log_dir", tmp_path / "logs")
    assert proc.code == 2 and one_line(proc.err).startswith("launch.py: error: command 1: its run name has 272 bytes")
    assert sorted(os.listdir(tmp_path)) == ["cmds.txt"]  # no run folder, no --out_dir, no log
