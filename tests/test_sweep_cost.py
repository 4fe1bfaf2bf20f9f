"""sweep_cost.py: the passes of a sweep's runs, counted by hand for small cases, and its bad input."""
from __future__ import annotations

import json

import pytest

import config
import sweep_cost


def test_pass_count_counts_named_terms_as_one():
    assert [sweep_cost.pass_count(p) for p in ("2", "3+dbl", "10+f+1", "2+3")] == [2, 4, 12, 5]


def test_run_cost_counts_steps_and_evaluation_passes_by_hand():
    argv = ["--dataset=cifar10", "--attack=fgsm", "--attack_init=zero", "--epochs=2", "--eval_iter_freq=200",
            "--n_final_eval=1000", "--eval_early_stopped_model"]
    c = sweep_cost.run_cost(config.parse_config(argv)[0])
    assert c["steps"] == 1 + 2 * (50000 // 128)  # epoch 0's one step, then 2 x 390
    assert c["train_passes"] == 2 * c["steps"]
    n_periodic = 780 // 200 + 1  # iterations 0, 200, 400, 600
    periodic = n_periodic * (256 * (1 + 10 + 2) + 256 * 10)
    assert c["eval_point_passes"] == periodic + 2 * 1000 * 500


def test_units_come_from_bench_json_else_from_a_method_with_the_same_passes(tmp_path, capsys):
    bench = {"steps": {"resnet18": {"methods": {"fgsm": {"label": "FGSM", "passes": "2", "units": 2.0},
                                                "elle_a": {"label": "ELLE-A", "passes": "2+3", "units": 5.0}}}}}
    assert sweep_cost.units_per_step(bench, "resnet18", "ELLE", "2+3") == 5.0
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    cmds = tmp_path / "cmds.txt"
    cmds.write_text("python train.py --dataset=cifar10 --attack=fgsm --attack_init=zero --epochs=1 "
                    "--eval_iter_freq=1000 --n_final_eval=128\n")
    assert sweep_cost.main([str(cmds), "--bench", str(path), "--seconds_per_unit", "3600"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    steps, evaluation = 391, (256 * 13 + 256 * 10) + 128 * 500  # one periodic evaluation, 'last' only
    assert row == (f"| FGSM | 1 | {steps} | {2 * steps / 1e6:.2f} | {evaluation / 128 / 1e6:.2f} | "
                   f"{steps * 2.0 + evaluation / 128:.0f} |")


@pytest.mark.parametrize("argv, text", [([], "no 'python train.py"), (["--seconds_per_unit", "0"], "must be > 0"),
                                        (["/nonexistent/cmds.txt"], "cannot read")])
def test_bad_input_exits_2_with_one_line(argv, text, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("echo nothing\n"))
    with pytest.raises(SystemExit) as exc:
        sweep_cost.main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and text in err
