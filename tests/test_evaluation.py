"""Evaluation: eval.py on a run's checkpoint (eps, architecture and normalisation from config.json),
the final evaluation under half precision, and the memory layout per pass (--channels_last,
precision.LAYOUTS): the choice is recorded, a layout changes the robust accuracy by rounding only, the
packed final evaluation (examples and restarts packed) gives the verdicts of a plain loop, and
the per-example verdicts agree between layouts (bench.py's layout_agreement part).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import bench
import eval as eval_py
import eval as evaluation
import models
import precision
import train
import utils
from tests.fixtures import TINY, eval_main, one_line, trained_digits_cnn


# --------------------------------------------------------------------------------------------- eval.py
def test_7_eval_takes_eps_from_the_run_and_says_which_eps_and_weights(finished, tmp_path, capsys):
    model = os.path.join(finished, "model.pth")
    code, out, err = eval_main(capsys, "--model_path", model)
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (result["eps"], result["eps_from"], result["weights"]) == (76, "config.json", "last")
    assert f"eps 76 (from config.json), 'last' weights of {model}" in one_line(err)
    code, out, err = eval_main(capsys, "--model_path", model, "--eps", "8", "--early_stopped_model")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and (result["eps"], result["eps_from"], result["weights"]) == (8, "--eps", "best")
    assert "eps 8 (from --eps), 'best' weights" in one_line(err)
    authors = tmp_path / "authors" / "model.pth"  # no config.json beside it: train.py's default eps
    authors.parent.mkdir()
    shutil.copy(model, authors)
    code, out, err = eval_main(capsys, "--model_path", str(authors), "--dataset", "digits", "--model", "cnn",
                               "--n_filters_cnn", "4")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["eps_from"] == "default"
    assert "eps 8 (from default)" in err


# ------------------------------------------------------------------------------------- AutoAttack
def test_eval_autoattack_gets_the_fp32_model_under_half_prec(tmp_path, monkeypatch):
    pytest.importorskip("torchattacks")
    import autoattack_eval
    import eval as eval_py
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 1, 4)
    path = str(tmp_path / "model.pth")
    torch.save({"last": model.state_dict(), "best": model.state_dict()}, path)
    phase, seen = ["pgd"], []
    build = models.build_model

    def spied(*args, **kwargs):  # the first conv's output dtype, per phase of eval.py
        net = build(*args, **kwargs)
        net._model[0].register_forward_hook(lambda m, i, out: seen.append((phase[0], out.dtype)))
        return net
    attack = autoattack_eval.attack_accuracy

    def marked(*args, **kwargs):
        phase[0] = "autoattack"
        return attack(*args, **kwargs)
    monkeypatch.setattr(models, "build_model", spied)
    monkeypatch.setattr(autoattack_eval, "attack_accuracy", marked)
    assert eval_py.main(["--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4", "--eps", "76",
                         "--model_path", path, "--n_eval", "8", "--batch_size_eval", "8", "--device", "cpu",
                         "--attack_iters", "2", "--n_restarts", "1", "--half_prec", "--attack", "autoattack"]) == 0
    assert {dtype for p, dtype in seen if p == "pgd"} == {torch.bfloat16}  # PGD keeps --half_prec
    assert {dtype for p, dtype in seen if p == "autoattack"} == {torch.float32}


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
    provenance = ("settings_from", "written", "model_path")
    assert drop(short[1], *provenance) == drop(spelled_out[1], *provenance)
    assert (short[1]["n_eval"], short[1]["attack_iters"], short[1]["n_restarts"]) == (64, 10, 3)  # the run's
    # An explicit flag overrides config.json (here wrongly: the checkpoint has 3 filters).
    assert eval_json(capsys, "--model_path", ckpt, "--eps", "76", "--n_filters_cnn", "4")[0] == 2
    # A checkpoint without config.json beside it (as the authors' files) needs the flags.
    bare = tmp_path / "authors" / "model.pth"
    bare.parent.mkdir()
    bare.write_bytes(open(ckpt, "rb").read())
    assert eval_json(capsys, "--model_path", str(bare), "--eps", "76")[0] == 2
    # ... and the settings of the run's final evaluation, to give its numbers
    final_eval = ["--n_eval", "64", "--batch_size_eval", "64", "--attack_iters", "10", "--n_restarts", "3"]
    code, alone = eval_json(capsys, "--model_path", str(bare), "--eps", "76", *architecture, *final_eval)
    assert code == 0 and alone["written"] is None  # no run: nothing written
    keep = ("clean_acc", "pgd_acc", "n_eval", "eps", "attack_iters", "n_restarts", "seed", "batch_size_eval")
    assert {k: alone[k] for k in keep} == {k: short[1][k] for k in keep}


def drop(result: dict, *keys: str) -> dict:
    return {k: v for k, v in result.items() if k not in keys}


def test_pass_layouts_on_off_auto():
    assert precision.pass_layouts("on", "cpu", "cnn") == {"train": True, "eval": True}
    assert precision.pass_layouts("off", "cuda", "resnet18") == {"train": False, "eval": False}
    for (device_type, model_name), table in precision.LAYOUTS.items():
        assert precision.pass_layouts("auto", device_type, model_name) == table
    assert precision.pass_layouts("auto", "cuda", "cnn") == {"train": True, "eval": True}
    assert precision.pass_layouts("auto", "cpu", "a_model_not_in_the_table") == {"train": False, "eval": False}
    with pytest.raises(ValueError, match="unknown layout choice"):
        precision.pass_layouts("yes", "cpu", "cnn")


def test_cpu_training_stays_contiguous_by_default():  # channels_last training would not repeat a run bit for bit
    assert not any(table["train"] for (device_type, _), table in precision.LAYOUTS.items() if device_type == "cpu")


def test_set_layout_and_input_layout():
    model = models.build_model("cnn", 10, (1, 8, 8), 2, 4)
    assert precision.input_layout(precision.set_layout(model, True)) == torch.channels_last
    assert precision.input_layout(precision.set_layout(model, False)) == torch.contiguous_format
    one_layer = precision.set_layout(models.build_model("cnn", 10, (1, 8, 8), 1, 4), True)
    assert precision.input_layout(one_layer) == torch.contiguous_format  # one input channel: both layouts coincide


def test_layout_copy_shares_the_scaler_and_leaves_the_model_alone():
    model = models.build_model("cnn", 10, (1, 8, 8), 2, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    wrapped = precision.Autocast(model, "cpu", torch.bfloat16, scaler=scaler)
    other = precision.layout_copy(wrapped, True)
    assert other.scaler is scaler and other.model is not model
    assert precision.input_layout(other) == torch.channels_last
    assert precision.input_layout(wrapped) == torch.contiguous_format


@pytest.mark.parametrize("choice", ["on", "off", "auto"])
def test_the_layouts_used_are_recorded(tmp_path, choice):
    args = TINY + ["--out_dir", str(tmp_path / "runs"), "--attack", "fgsm", "--channels_last", choice,
                   "--n_layers", "2", "--n_filters_cnn", "4"]
    assert train.main(args) == 0
    cfg, defaults = train.parse_config(args)
    run_dir = os.path.join(tmp_path / "runs", train.run_name(cfg, defaults))
    # auto (the default) is not named; on and off round differently, so they name other runs
    assert os.path.basename(run_dir).endswith({"auto": "_seed0", "on": "_clon_seed0", "off": "_cloff_seed0"}[choice])
    expected = precision.layout_names(precision.pass_layouts(choice, "cpu", "cnn"))
    config = json.load(open(os.path.join(run_dir, "config.json")))
    final = json.load(open(os.path.join(run_dir, "final.json")))
    assert config["channels_last"] == choice and config["layouts"] == expected
    assert final["eval_layout"] == expected["eval"]
    if choice == "on":
        assert expected == {"train": "channels_last", "eval": "channels_last"}
    if choice == "off":
        assert expected == {"train": "contiguous", "eval": "contiguous"}


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
        copy = precision.set_layout(models.build_model("cnn", 10, (1, 8, 8), 2, 8), cl).eval()
        copy.load_state_dict(model.state_dict())
        assert precision.input_layout(copy) == (torch.channels_last if cl else torch.contiguous_format)
        results[cl] = utils.seeded_robust_accuracy(copy, batches, eps, 10, 2, seed=0)
    n = results[False].n_eval
    assert results[False].clean_acc == results[True].clean_acc == 1.0
    assert 0.0 < results[False].pgd_acc < 1.0  # the attack breaks some examples, not all
    assert abs(results[False].pgd_acc - results[True].pgd_acc) * n <= max(1, n // 1000)


def one_restart_at_a_time(model, batches, eps, alpha, n_iters, n_restarts):
    """The final evaluation as it was written before the packed batch and restart packing, restated: one
    restart after another, every step gathers the examples not yet fooled out of the restart's batch and
    scatters their new delta back. Returns clean and robust accuracy, the per-example verdicts, the
    forward+backward passes per example summed and the number of batched attack steps."""
    n_clean = n_robust = n_total = passes = steps = 0
    verdicts = []
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
                if live.numel() == 0:
                    break
                passes += live.numel()
                steps += 1
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
        verdicts.append(robust)
    return n_clean / n_total, n_robust / n_total, torch.cat(verdicts), passes, steps


class CountingForward(torch.nn.Module):
    """The model, counting the batched forward passes that build a graph (the attack's steps)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.steps = model, 0

    def forward(self, x):
        self.steps += torch.is_grad_enabled()
        return self.model(x)


@pytest.mark.parametrize("eps_255", [16, 48])
def test_packed_final_evaluation_gives_the_verdicts_of_one_restart_at_a_time(eps_255):
    """Restarts packed side by side (and examples packed within a restart) leave every per-example verdict
    as the plain loop gives it, from the same seeded starts, and the RNG in the same state; the survivors'
    restarts take fewer batched steps."""
    model, x, y = trained_digits_cnn()
    batches = list(zip(x[1000:1400].split(128), y[1000:1400].split(128)))
    eps = eps_255 / 255
    counted = CountingForward(model)
    ours = utils.seeded_robust_accuracy(counted, batches, eps, 20, 5, seed=0)
    after_ours = torch.rand(1)
    torch.manual_seed(0)
    clean, robust, verdicts, _, steps = one_restart_at_a_time(model, batches, eps, utils.eval_alpha(eps), 20, 5)
    assert (ours.clean_acc, ours.pgd_acc) == (clean, robust)
    assert torch.equal(ours.robust, verdicts)
    assert torch.equal(torch.rand(1), after_ours)  # the same random draws, in the same number
    assert 0.0 < ours.pgd_acc < ours.clean_acc  # early exit happened, and some examples stayed robust
    assert counted.steps < steps  # some restarts ran side by side


def test_one_restart_takes_the_passes_of_the_plain_loop():
    """With one restart there is nothing to pack: the pass count is the plain loop's, step for step."""
    model, x, y = trained_digits_cnn()
    batches = list(zip(x[1000:1400].split(128), y[1000:1400].split(128)))
    eps = 48 / 255
    ours = utils.seeded_robust_accuracy(model, batches, eps, 20, 1, seed=0)
    torch.manual_seed(0)
    clean, robust, verdicts, passes, _ = one_restart_at_a_time(model, batches, eps, utils.eval_alpha(eps), 20, 1)
    assert (ours.clean_acc, ours.pgd_acc, ours.grad_passes) == (clean, robust, passes)
    assert torch.equal(ours.robust, verdicts)


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
    monkeypatch.setitem(precision.LAYOUTS, ("cpu", "cnn"), {"train": False, "eval": True})
    args = (TINY + ["--attack", "fgsm", "--n_layers", "2", "--n_filters_cnn", "4"]
            + (["--half_prec"] if half_prec else []))
    runs = {}
    for choice in ("auto", "off"):
        out = str(tmp_path / choice)
        assert train.main(args + ["--out_dir", out, "--channels_last", choice]) == 0
        cfg, defaults = train.parse_config(args + ["--channels_last", choice])
        run_dir = os.path.join(out, train.run_name(cfg, defaults))
        runs[choice] = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        layouts = json.load(open(os.path.join(run_dir, "config.json")))["layouts"]
        assert layouts == ({"train": "contiguous", "eval": "channels_last"} if choice == "auto"
                           else {"train": "contiguous", "eval": "contiguous"})
    for a, b in zip(runs["auto"], runs["off"]):
        assert a["train_loss"] == b["train_loss"]  # training is the same: its layout did not change
        assert abs(a["test_pgd_acc"] - b["test_pgd_acc"]) <= 1 / 64 + 1e-9


def test_verdicts_follow_the_input_order_and_add_up_to_the_robust_accuracy():
    torch.manual_seed(0)
    model = models.build_model("cnn", 10, (1, 8, 8), 2, 8).eval()
    x = torch.rand(120, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    wrong = torch.arange(120) % 3 == 0  # every third label is not the prediction: never robust
    y = torch.where(wrong, (y + 1) % 10, y)
    result = utils.seeded_robust_accuracy(model, list(zip(x.split(50), y.split(50))), 16 / 255, 10, 2, seed=0)
    assert result.robust.dtype == torch.bool and result.robust.shape == (120,)
    assert int(result.robust.sum()) == round(result.pgd_acc * 120)
    assert not result.robust[wrong].any()
    assert 0 < int(result.robust.sum()) < int((~wrong).sum())  # some robust, some broken by the attack


def test_default_parts_leave_out_the_layout_agreement():
    s = bench.parse_settings(["--device", "cpu"])
    assert "layout_agreement" not in s.parts and s.parts == bench.DEFAULT_PARTS
    assert s.agreement["resnet18"] == bench.EvalSize(1000, 256, 50, 10)


def test_quick_layout_agreement_counts_differing_verdicts(tmp_path):
    out = tmp_path / "b.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--parts", "layout_agreement", "--out", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["layout_agreement"]) == {"cnn", "resnet18"}
    for r in report["layout_agreement"].values():
        assert 0 <= r["verdicts_differ"] <= r["n_eval"]
        assert r["within_rounding"] == (r["verdicts_differ"] <= r["allowed"])
        for layout in ("contiguous", "channels_last"):
            assert 0 <= r[f"robust_acc_{layout}"] <= r[f"clean_acc_{layout}"] <= 1
            assert r[f"seconds_{layout}"] > 0
        # a verdict that differs moves the robust accuracy by at most one example each
        gap = abs(r["robust_acc_contiguous"] - r["robust_acc_channels_last"]) * r["n_eval"]
        assert gap <= r["verdicts_differ"] + 1e-6
    assert report["layout_agreement"]["resnet18"]["clean_acc_contiguous"] == 1.0  # every example attacked


# ------------------------------------------------------------- eval.py on a run: its final evaluation again
def copied_run(tiny_run, tmp_path, *flags: str) -> str:
    """A copy of a shared tiny run under tmp_path/runs (eval.py writes into a run's evals/)."""
    source = tiny_run(*flags).run_dir
    run_dir = str(tmp_path / "runs" / os.path.basename(source))
    shutil.copytree(source, run_dir)
    return run_dir


def test_eval_on_a_run_gives_final_json_and_saves_into_evals_which_report_shows(tiny_run, tmp_path, cli):
    run_dir = copied_run(tiny_run, tmp_path, "--attack", "fgsm", "--eval_early_stopped_model")
    final = json.load(open(os.path.join(run_dir, "final.json")))
    for target, weights, flags in ((os.path.join(run_dir, "model.pth"), "last", ()),
                                   (run_dir, "best", ("--early_stopped_model",))):
        proc = cli("eval.py", "--model_path", target, *flags)
        result = json.loads(proc.out_lines[-1])
        assert proc.code == 0, proc.err
        assert (result["clean_acc"], result["pgd_acc"]) == (final[weights]["clean_acc"], final[weights]["pgd_acc"])
        assert (result["n_eval"], result["attack_iters"], result["n_restarts"]) == (64, 10, 3)  # TINY's, --debug
        assert result["final_json"] is True and result["changed"] == []
        assert f"'{weights}' weights of {os.path.join(run_dir, 'model.pth')} = final.json; settings: the run's " \
               "final evaluation; saved as" in one_line(proc.err)
        saved = json.load(open(result["written"]))
        assert os.path.dirname(result["written"]) == os.path.join(run_dir, "evals")
        assert (saved["pgd_acc"], saved["weights"], saved["run_name"]) == (result["pgd_acc"], weights,
                                                                          final["run_name"])
    # another eps: the summary names the change; the file is named by what was evaluated
    proc = cli("eval.py", "--model_path", run_dir, "--eps", "40")
    result = json.loads(proc.out_lines[-1])
    assert proc.code == 0 and result["final_json"] is None
    assert "settings: the run's final evaluation but --eps 40 (the run: 76)" in one_line(proc.err)
    assert sorted(os.listdir(os.path.join(run_dir, "evals"))) == [
        "pgd-10-3_eps40_test64_last.json", "pgd-10-3_eps76_test64_best.json", "pgd-10-3_eps76_test64_last.json"]
    # report.py shows the re-evaluations beside final.json's numbers; a damaged file is named and skipped
    with open(os.path.join(run_dir, "evals", "torn.json"), "w") as f:
        f.write('{"clean_acc": 0.5')
    proc = cli("report.py", tmp_path / "runs", "--out", tmp_path / "report")
    name = os.path.basename(run_dir)
    own = f"{100 * final['last']['clean_acc']:.1f} / {100 * final['last']['pgd_acc']:.1f} (eps 76, 64 points)"
    assert (f"| {name} | last | PGD-10-3 | 40 | 64 | {100 * result['clean_acc']:.1f} | "
            f"{100 * result['pgd_acc']:.1f} | – | {own} |") in proc.out
    assert f"| {name} | best | PGD-10-3 | 76 | 64 |" in proc.out and proc.out.count(f"| {name} |") == 3
    torn = os.path.join(run_dir, "evals", "torn.json")
    assert f"report.py: warning: skipped {torn}: unreadable or not whole JSON" in one_line(proc.err)
    assert f"- {torn}: unreadable" in open(tmp_path / "report" / "report.md").read()
    # --overwrite retrains the weights: their old re-evaluations go with them
    import rundir
    rundir.clear_outputs(run_dir)
    assert not os.path.exists(os.path.join(run_dir, "evals"))


def test_eval_out_writes_elsewhere_and_a_bare_checkpoint_says_where_each_setting_came_from(
        finished, tmp_path, cli):
    bare = tmp_path / "authors" / "model.pth"  # no config.json beside it
    bare.parent.mkdir()
    shutil.copy(os.path.join(finished, "model.pth"), bare)
    proc = cli("eval.py", "--model_path", bare, "--dataset", "digits", "--model", "cnn", "--n_filters_cnn", "4",
               "--n_eval", "8", "--device", "cpu", "--out", tmp_path / "here.json")
    assert proc.code == 0 and json.loads(proc.out_lines[-1])["written"] == str(tmp_path / "here.json")
    assert ("no config.json beside the checkpoint: dataset digits (--dataset), model cnn (--model), n_layers 1 "
            "(default), n_filters_cnn 4 (--n_filters_cnn), normalize none (default), eps 8 (default), n_eval 8 "
            "(--n_eval), batch_size_eval 1024 (default), seed 0 (default)") in one_line(proc.err)
    assert json.load(open(tmp_path / "here.json"))["n_eval"] == 8 and os.listdir(bare.parent) == ["model.pth"]


def test_eval_bad_cases_are_one_line_exit_2_nothing_written(finished, tmp_path, cli):
    from tests.fixtures import snapshot
    unfinished = tmp_path / "unfinished"  # a run directory without model.pth
    unfinished.mkdir()
    shutil.copy(os.path.join(finished, "config.json"), unfinished)
    bare = tmp_path / "bare"  # weights without config.json: eval.py assumes train.py's default architecture
    bare.mkdir()
    shutil.copy(os.path.join(finished, "model.pth"), bare)
    before = snapshot(tmp_path)
    proc = cli("eval.py", "--model_path", unfinished)
    assert proc.code == 2 and one_line(proc.err) == (
        f"eval.py: error: {unfinished} is a folder without model.pth (an unfinished run?); give a run directory "
        "that has finished, or the checkpoint file, as --model_path")
    proc = cli("eval.py", "--model_path", bare / "model.pth", "--device", "cpu")
    assert proc.code == 2 and one_line(proc.err).startswith("eval.py: error: checkpoint does not fit PreActResNet18")
    assert one_line(proc.err).endswith("(no config.json beside the checkpoint, so eval.py assumed --dataset cifar10 "
                                       "--model resnet18 --n_layers 1 --n_filters_cnn 16 --normalize none)")
    proc = cli("eval.py", "--model_path", finished, "--seed=99999999999999999999")
    assert proc.code == 2 and one_line(proc.err) == (
        "eval.py: error: --seed must be in [0, 2**32 - 1] (got 99999999999999999999): numpy's seeds are 32-bit")
    proc = cli("eval.py", "--model_path", finished, "--threads", "0")
    assert proc.code == 2 and "--threads must be >= 1 (got 0)" in one_line(proc.err)
    assert snapshot(tmp_path) == before


def test_config_json_records_the_numerics_and_eval_py_takes_the_runs_thread_count(tmp_path, cli):
    import torch

    from tests.fixtures import run_train
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--threads", "2")  # not tiny_run: no name says the count
    recorded = json.load(open(os.path.join(run_dir, "config.json")))["numerics"]
    assert (recorded["threads"], recorded["device_type"], recorded["torch"]) == (2, "cpu", torch.__version__)
    assert recorded["cuda"] == torch.version.cuda and recorded["deterministic_algorithms"] is False
    assert torch.get_num_threads() == 1  # train.py put the test process's count back
    proc = cli("eval.py", "--model_path", run_dir)
    result = json.loads(proc.out_lines[-1])
    assert result["threads_used"] == 2 and result["settings_from"]["threads"] == "config.json"
    assert result["final_json"] is True and torch.get_num_threads() == 1
    proc = cli("eval.py", "--model_path", run_dir, "--threads", "1")
    assert "settings: the run's final evaluation but 1 threads (the run: 2)" in one_line(proc.err)
    assert "pgd-10-3_eps76_test64_last_threads1.json" in os.listdir(os.path.join(run_dir, "evals"))
