"""End-to-end tests of train.py and eval.py on the embedded digits data (CPU, in-process)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

import eval as eval_py
import train
from tests.fixtures import TINY, read_metrics, run_train

METHODS = {
    "fgsm": ["--attack", "fgsm", "--attack_init", "zero"],
    "fgsm_rs": ["--attack", "fgsm", "--attack_init", "random"],
    "free_at": ["--attack", "fgsm", "--minibatch_replay", "3", "--fgsm_alpha", "1.0"],
    "pgd": ["--attack", "pgd", "--attack_init", "zero", "--pgd_train_n_iters", "2", "--pgd_alpha_train", "38"],
    "pgd_corner": ["--attack", "pgd_corner", "--pgd_train_n_iters", "2", "--pgd_alpha_train", "38"],
    "random_corner": ["--attack", "random_corner"],
    "none": ["--attack", "none"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("lam", ["0", "1"])
def test_every_method_writes_the_run_files(tiny_run, method, lam):
    extra = METHODS[method] + ["--grad_align_cos_lambda", lam]
    if method in ("fgsm", "pgd"):
        extra.append("--half_prec")  # the bf16 autocast path, double backprop included
    run_dir = tiny_run(*extra).run_dir
    for name in ("config.json", "metrics.jsonl", "model.pth", "final.json"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert not os.path.exists(os.path.join(run_dir, "log.txt"))  # --debug: no log file, as in the authors' code
    assert not os.path.exists(os.path.join(run_dir, train.RESUME_FILE))
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert 0 <= final["last"]["pgd_acc"] <= final["last"]["clean_acc"] <= 1
    assert (final["n_eval"], final["attack_iters"], final["n_restarts"], final["eps"]) == (64, 10, 3, 76)
    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [0, 2, 4]
    keys = {"epoch", "iteration", "lr", "train_loss", "train_reg", "train_acc", "test_clean_acc", "test_fgsm_acc",
            "test_pgd_acc", "train_pgd_acc", "cos_x_eta", "cos_fgsm_pgd", "grad_norm_x", "delta_l2",
            "elapsed_s", "filter_norms"}
    assert keys <= set(rows[-1])
    for row in rows:
        assert not any(math.isnan(v) for v in row.values() if isinstance(v, float)), row
    no_input_grad = lam == "0" and METHODS[method][1] not in ("fgsm",)  # forward-only monitoring pass
    assert all((r["grad_norm_x"] is None) == no_input_grad for r in rows[1:])
    if lam == "0":
        assert all(r["train_reg"] == 0 for r in rows)
    else:
        assert any(r["train_reg"] > 0 for r in rows[1:])
    ckpt = torch.load(os.path.join(run_dir, "model.pth"), weights_only=True)
    assert set(ckpt) == {"last", "best"}
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["clamp_grad"] == "half" and config["torch_version"] == torch.__version__


def test_log_file_and_eval_py_reproduces_final_json(tmp_path, capsys):
    args = [a for a in TINY if a != "--debug"]
    out = str(tmp_path / "runs")
    assert train.main(args + ["--out_dir", out, "--attack", "fgsm", "--grad_align_cos_lambda", "1"]) == 0
    (name,) = os.listdir(out)
    run_dir = os.path.join(out, name)
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "final (last): clean" in log and "PGD-50-10" in log
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert (final["attack_iters"], final["n_restarts"]) == (50, 10)
    capsys.readouterr()
    code = eval_py.main(["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--eps", "76",
                         "--model_path", os.path.join(run_dir, "model.pth"), "--n_eval", "64",
                         "--batch_size_eval", "64", "--device", "cpu", "--seed", "0"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["clean_acc"] == final["last"]["clean_acc"]
    assert result["pgd_acc"] == final["last"]["pgd_acc"]
    assert (result["n_eval"], result["attack_iters"], result["n_restarts"]) == (64, 50, 10)


def eval_json(capsys, *flags: str) -> tuple[int, dict | None]:
    """eval.main's exit code and the JSON object on the last line of its stdout (None if it failed)."""
    capsys.readouterr()
    code = eval_py.main(list(flags))
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if code == 0 else None


def test_eval_py_reads_the_architecture_from_config_json(tmp_path, capsys, tiny_run):
    run_dir = tiny_run("--attack", "fgsm", "--n_filters_cnn", "3").run_dir
    ckpt = os.path.join(run_dir, "model.pth")
    architecture = ["--dataset", "digits", "--model", "cnn", "--n_layers", "1", "--n_filters_cnn", "3"]
    short = eval_json(capsys, "--model_path", ckpt, "--eps", "76")
    spelled_out = eval_json(capsys, "--model_path", ckpt, "--eps", "76", *architecture)
    assert short[0] == spelled_out[0] == 0
    assert short[1] == spelled_out[1] and short[1]["n_eval"] == 256
    # An explicit flag overrides config.json (here wrongly: the checkpoint has 3 filters).
    assert eval_json(capsys, "--model_path", ckpt, "--eps", "76", "--n_filters_cnn", "4")[0] == 2
    # A checkpoint without config.json beside it (as the authors' files) needs the flags.
    bare = tmp_path / "authors" / "model.pth"
    bare.parent.mkdir()
    bare.write_bytes(open(ckpt, "rb").read())
    assert eval_json(capsys, "--model_path", str(bare), "--eps", "76")[0] == 2
    assert eval_json(capsys, "--model_path", str(bare), "--eps", "76", *architecture)[1] == {
        **spelled_out[1], "model_path": str(bare)}


def test_second_launch_skips_and_overwrite_retrains(tmp_path, capsys):
    run_dir = run_train(tmp_path, "--attack", "none")
    final_path = os.path.join(run_dir, "final.json")
    before = os.path.getmtime(final_path), open(final_path).read()
    capsys.readouterr()
    assert train.main(TINY + ["--out_dir", str(tmp_path / "runs"), "--attack", "none"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (os.path.getmtime(final_path), open(final_path).read()) == before
    assert train.main(TINY + ["--out_dir", str(tmp_path / "runs"), "--attack", "none", "--overwrite"]) == 0
    assert os.path.getmtime(final_path) >= before[0]


def test_same_seed_same_numbers(tmp_path):
    def numbers(sub):
        run_dir = run_train(tmp_path / sub, "--attack", "fgsm", "--grad_align_cos_lambda", "0.5", "--epochs", "2")
        rows = read_metrics(run_dir)
        for r in rows:
            r.pop("elapsed_s"), r.pop("train_minutes")
        final = json.load(open(os.path.join(run_dir, "final.json")))
        final.pop("train_minutes")
        return rows, final
    assert numbers("a") == numbers("b")


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
