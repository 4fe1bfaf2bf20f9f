"""report.py on synthetic run directories with known numbers (config.json as train.py writes it)."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

import config
import methods
import report
import train
from tests.fixtures import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PAPER = ["--half_prec", "--eval_early_stopped_model", "--n_final_eval=1000", "--batch_size_eval=1024"]
FGSM = ["--attack=fgsm", "--attack_init=zero"]
GRADALIGN = ["--attack=fgsm", "--attack_init=zero", "--lr_max=0.30", "--grad_align_cos_lambda=0.2"]


def config_of(argv: list[str]) -> dict:
    """config.json's content for these train.py flags."""
    cfg, defaults = train.parse_config(argv)
    return {**dataclasses.asdict(cfg), "run_name": train.run_name(cfg, defaults), "argv": argv}


def write_run(root, argv: list[str], final: dict | None, metrics: list[dict] = ()) -> str:
    """A run directory as train.py leaves it; final.json gets the run's eps, as train.py writes it."""
    config = config_of(argv)
    run_dir = os.path.join(root, config["run_name"])
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    if final is not None:
        with open(os.path.join(run_dir, "final.json"), "w") as f:
            json.dump({**final, "eps": config["eps"]}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    return run_dir


def final_of(clean: float, pgd: float, best: tuple[float, float] | None = None, n_eval: int = 1000,
             cos: float = 0.9) -> dict:
    final = {"last": {"clean_acc": clean, "pgd_acc": pgd, "cos_x_eta": cos}, "n_eval": n_eval, "attack_iters": 50,
             "n_restarts": 10, "train_minutes": 1.5, "best_train_pgd_acc": 0.3}
    if best is not None:
        final["best"] = {"clean_acc": best[0], "pgd_acc": best[1], "cos_x_eta": cos}
    return final


def metrics_of(n: int, collapse_at: int) -> list[dict]:
    return [{"epoch": i // 2, "iteration": 200 * i, "lr": 0.1, "train_loss": 1.0, "train_reg": 0.0, "train_acc": 0.5,
             "train_pgd_acc": 0.4 if i < collapse_at else 0.0, "test_clean_acc": 0.8, "test_fgsm_acc": 0.5,
             "test_pgd_acc": 0.4 if i < collapse_at else 0.0, "cos_x_eta": 0.95 if i < collapse_at else 0.1,
             "cos_fgsm_pgd": 0.9, "grad_norm_x": 1.0, "delta_l2": 1.0, "train_minutes": i, "elapsed_s": 60 * i}
            for i in range(n)]


@pytest.fixture
def sweep(tmp_path):
    """FGSM and FGSM + GradAlign at eps 8 and 16, seeds 0-2 (clean 80/82/84%, PGD 0/1/2% + offsets), one
    extra GradAlign run at 16 evaluated on 500 points, one unfinished run, one run of another dataset."""
    root = tmp_path / "runs"
    for m, method in enumerate((FGSM, GRADALIGN)):
        for eps in (8, 16):
            for seed in range(3):
                offset = 0.1 * m + 0.01 * (eps == 16)
                write_run(root, [*method, f"--eps={eps}", f"--seed={seed}", *PAPER],
                          final_of(0.80 + 0.02 * seed, offset + 0.01 * seed, best=(0.7, 0.3 + 0.03 * seed),
                                   cos=0.1 * (seed + 1)),
                          metrics_of(5, collapse_at=3 if m == 0 else 99))
    write_run(root, [*GRADALIGN, "--eps=16", "--seed=3", *PAPER], final_of(0.5, 0.5, best=(0.5, 0.5), n_eval=500))
    write_run(root, [*FGSM, "--eps=8", "--seed=4", *PAPER], None, metrics_of(2, 99))
    write_run(root, ["--dataset=svhn", *FGSM, "--eps=4", "--seed=0", *PAPER], final_of(0.9, 0.5))
    return root


def test_aggregate_means_stds_and_counts(sweep):
    runs = report.collect_runs([str(sweep)])
    assert len(runs) == 15 and sum(r.final is None for r in runs) == 1
    rows = {(r["dataset"], r["method"], r["eps"]): r for r in report.aggregate(runs)}
    assert set(rows) == {("cifar10", m, e) for m in ("FGSM", "FGSM + GradAlign") for e in (8.0, 16.0)} | {
        ("svhn", "FGSM", 4.0)}
    row = rows["cifar10", "FGSM", 8.0]
    assert (row["n_seeds"], row["seeds"], row["n_eval"], row["attack_iters"], row["n_restarts"]) == (3, "0 1 2", 1000,
                                                                                                       50, 10)
    assert row["model"] == "resnet18"
    assert row["last_clean_mean"] == pytest.approx(82.0)
    assert row["last_clean_std"] == pytest.approx(math.sqrt(8 / 3))  # ddof=0 over 80, 82, 84
    assert row["last_pgd_mean"] == pytest.approx(1.0)
    assert row["last_pgd_std"] == pytest.approx(math.sqrt(2 / 3))
    assert row["best_pgd_mean"] == pytest.approx(33.0) and row["best_clean_std"] == pytest.approx(0.0)
    assert row["cos_x_eta_mean"] == pytest.approx(0.2)
    assert row["n_best"] == 3 and row["flags"] == ""
    assert rows["cifar10", "FGSM + GradAlign", 8.0]["last_pgd_mean"] == pytest.approx(11.0)
    assert rows["cifar10", "FGSM", 16.0]["last_pgd_mean"] == pytest.approx(2.0)


def test_a_run_with_another_protocol_is_flagged(sweep):
    rows = {(r["method"], r["eps"]): r for r in report.aggregate(report.collect_runs([str(sweep)]))}
    row = rows["FGSM + GradAlign", 16.0]
    assert row["n_seeds"] == 4 and row["n_eval"] == "1000/500"
    assert "n_eval 1000/500 (paper: 1000)" in row["flags"]
    assert row["last_clean_mean"] == pytest.approx((80 + 82 + 84 + 50) / 4)
    assert rows["FGSM + GradAlign", 8.0]["flags"] == ""


def test_flags_settings_that_differ_within_a_group(tmp_path):
    write_run(tmp_path, [*FGSM, "--seed=0", *PAPER], final_of(0.8, 0.4))
    write_run(tmp_path, [*FGSM, "--seed=1", "--lr_max=0.1", "--debug", *PAPER], final_of(0.8, 0.4))
    write_run(tmp_path, [*FGSM, "--seed=2", *PAPER], {**final_of(0.8, 0.4), "attack_iters": 10, "n_restarts": 3})
    (row,) = report.aggregate(report.collect_runs([str(tmp_path)]))
    for text in ("settings differ within the group: lr_max", "debug runs", "attack_iters 10/50", "n_restarts 10/3"):
        assert text in row["flags"]


def test_flags_runs_of_a_group_that_ran_under_different_numerics(tmp_path):
    for seed, threads in ((0, 1), (1, 1), (2, 4)):
        run_dir = write_run(tmp_path, [*FGSM, f"--seed={seed}", *PAPER], final_of(0.8, 0.4))
        with open(os.path.join(run_dir, "config.json")) as f:
            settings = json.load(f)
        settings["numerics"] = {"threads": threads, "device_type": "cpu", "cpu": f"cpu model {seed}"}
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(settings, f)
    (row,) = report.aggregate(report.collect_runs([str(tmp_path)]))
    # the CPU model says where a run ran; only what changes the rounding is flagged, and not as a setting
    assert row["flags"] == "ran under different numerics (rounding differs): threads 1/4"


@pytest.mark.parametrize(("argv", "name"), [
    (["--attack=fgsm", "--attack_init=zero"], "FGSM"),
    (["--attack=fgsm", "--attack_init=random"], "FGSM-RS"),
    (["--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=0.2"], "FGSM + GradAlign"),
    (["--attack=fgsm", "--attack_init=random", "--grad_align_cos_lambda=0.2"], "FGSM-RS + GradAlign"),
    (["--attack=fgsm", "--attack_init=zero", "--minibatch_replay=8", "--fgsm_alpha=1.0"], "Free-AT (m=8)"),
    (["--attack=pgd", "--attack_init=zero", "--pgd_train_n_iters=2"], "PGD-2"),
    (["--attack=pgd", "--attack_init=zero", "--pgd_train_n_iters=10"], "PGD-10"),
    (["--attack=pgd", "--attack_init=random", "--pgd_train_n_iters=10"], "PGD-10-RS"),
    (["--attack=pgd_corner", "--attack_init=zero", "--pgd_train_n_iters=2"], "PGD-2 corner"),
    (["--attack=random_corner", "--grad_align_cos_lambda=1"], "Random corner + GradAlign"),
    (["--attack=none"], "Standard"),
    (["--attack=nfgsm"], "N-FGSM"),
    (["--attack=nfgsm", "--nfgsm_noise_mult=1"], "N-FGSM (k=1, alpha=1)"),
    (["--attack=fgsm", "--zerograd_q=0.35", "--fgsm_alpha=2"], "ZeroGrad"),
    (["--attack=fgsm", "--attack_init=zero", "--elle_lambda=1000"], "ELLE"),
    (["--attack=fgsm", "--attack_init=zero", "--elle_lambda=4000", "--elle_adaptive"], "ELLE-A"),
    (["--attack=nfgsm", "--elle_lambda=4000", "--elle_adaptive"], "N-FGSM + ELLE-A"),
    (["--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=0.2", "--grad_align_fd=0.001"],
     "FGSM + GradAlign (FD)"),
    (["--attack=fgsm", "--attack_init=zero", "--grad_align_cos_lambda=0.2", "--grad_align_grad1=graph",
      "--grad_align_every=4"], "FGSM + GradAlign (grad1 graph, every 4)"),
])
def test_method_names(argv, name):
    assert report.method_name(config_of(argv)) == name


def test_model_names():
    assert report.model_name(config_of([])) == "resnet18"
    assert report.model_name(config_of(["--model=cnn", "--n_filters_cnn=4"])) == "cnn-1x4"


def test_cli_writes_markdown_csv_and_figures(sweep, tmp_path, capsys):
    out = tmp_path / "reports"
    fgsm_run = next(p for p in sweep.iterdir()
                    if "cifar10_resnet18_fgsm_zero_eps8_lam0_" in p.name and "seed0" in p.name)
    assert report.main([str(sweep), "--out", str(out), "--curves", str(fgsm_run)]) == 0
    printed = capsys.readouterr().out
    assert "82.0 ± 1.6" in printed and "Skipped" in printed
    md = (out / "report.md").read_text()
    assert "| FGSM | 1.0 ± 0.8 | 2.0 ± 0.8 |" in md  # robust accuracy, last weights, eps 8 and 16
    assert "[4×1000/500] †" in md and "n_eval 1000/500 (paper: 1000)" in md
    assert "3 seeds × 1000 test points" in md and "PGD-50-10" in md and "ddof=0" in md
    assert "cifar10_resnet18_fgsm_zero_eps8_lam0_" in md.split("## Skipped")[1]  # the unfinished run
    assert "AutoAttack" not in md and "‡" not in md  # no run has it: no AutoAttack tables or columns
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and list(rows[0]) == report.CSV_COLUMNS
    row = next(r for r in rows if (r["dataset"], r["method"], r["eps"]) == ("cifar10", "FGSM", "8.0000"))
    assert (row["n_seeds"], row["n_eval"], row["attack_iters"], row["n_restarts"]) == ("3", "1000", "50", "10")
    assert float(row["last_clean_mean"]) == pytest.approx(82.0)
    assert float(row["cos_x_eta_mean"]) == pytest.approx(0.2)
    pngs = ["robust_vs_eps_cifar10_resnet18.png", "robust_vs_eps_svhn_resnet18.png", "curves.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert os.path.getsize(out / "report.md") > 0


def test_runs_glob_selects_runs(sweep, tmp_path):
    runs = report.collect_runs([str(sweep)], "svhn_*")
    assert [r.config["dataset"] for r in runs] == ["svhn"]
    assert report.main([str(sweep), "--out", str(tmp_path / "r"), "--runs-glob", "nothing*"]) == 1


@pytest.mark.slow
def test_importing_runs_nothing(tmp_path):
    """Importing report.py and launch.py writes nothing, prints nothing and loads neither torch nor pyplot."""
    code = "import sys, report, launch; print(sorted({'torch', 'matplotlib.pyplot'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.stdout == "[]\n" and out.stderr == ""
    assert os.listdir(tmp_path) == []


def test_passes_per_step_agree_with_bench():
    import timing  # imports torch: only in this test
    for label, flags, passes in timing.METHODS.values():
        assert report.passes_per_step(config_of(flags)) == passes, label
        assert report.method_name(config_of(flags)) == label
    assert report.passes_per_step(config_of(["--attack=pgd", "--pgd_train_n_iters=7"])) == "7+f+1"
    assert report.passes_per_step(config_of(["--attack=fgsm", "--attack_init=random",
                                             "--grad_align_cos_lambda=0.2"])) == "3+dbl"


def test_robustness_vs_cost_table(tmp_path):
    nfgsm = ["--attack=nfgsm"]
    for seed in range(2):
        for eps in (8, 16):
            fast = {**final_of(0.8, 0.2 + 0.1 * seed, cos=0.5), "train_minutes": 1.0}
            slow = {**final_of(0.7, 0.4 + 0.1 * seed, cos=0.9), "train_minutes": 3.0}
            write_run(tmp_path / "runs", [*FGSM, f"--eps={eps}", f"--seed={seed}", *PAPER], fast)
            write_run(tmp_path / "runs", [*nfgsm, f"--eps={eps}", f"--seed={seed}", *PAPER], slow)
    bench_json = tmp_path / "bench.json"
    bench_json.write_text(json.dumps({"steps": {"resnet18": {"methods": {
        "fgsm": {"label": "FGSM", "units": 1.7}, "nfgsm": {"label": "N-FGSM", "units": 1.8}}}}}))
    out = tmp_path / "reports"
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--bench", str(bench_json)]) == 0
    md = (out / "report.md").read_text()
    table = md.split("### Robustness vs cost")[1]
    # 30 epochs: 60 s / 30 = 2 s per epoch for FGSM, 6 s for N-FGSM, three times FGSM's
    assert "| FGSM | 2 | 2.00 | 1.0 | 1.70 | 25.0 ± 5.0 | 25.0 ± 5.0 | 80.0 ± 0.0 | 0.500 ± 0.000 |" in table
    assert "| N-FGSM | 2 | 6.00 | 3.0 | 1.80 | 45.0 ± 5.0 | 45.0 ± 5.0 | 70.0 ± 0.0 | 0.900 ± 0.000 |" in table
    assert "robust_vs_eps_cifar10_resnet18.png" in os.listdir(out)
    assert report.main([str(tmp_path / "runs"), "--out", str(out), "--bench", str(tmp_path / "missing.json")]) == 2


def test_a_finished_run_without_config_json_is_listed_as_damaged_and_counted_in_the_summary(tmp_path, capsys):
    kept = write_run(tmp_path / "runs", [*FGSM, *PAPER], final_of(0.8, 0.4))
    lost = write_run(tmp_path / "runs", [*FGSM, *PAPER, "--seed=1"], final_of(0.7, 0.3))
    os.remove(os.path.join(lost, "config.json"))
    code = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "reports")])
    out = capsys.readouterr().out
    assert code == 0
    assert "1 finished runs in 1 groups, 0 skipped, 1 not counted" in out
    damaged = (tmp_path / "reports" / "report.md").read_text().split("## Damaged (not counted)")[1]
    assert (f"- {os.path.basename(lost)}: {lost}/config.json is missing (final.json is there: the run finished, "
            "but its settings are unknown); restore config.json, or relaunch its command with --overwrite") in damaged
    assert os.path.basename(kept) not in damaged


@pytest.mark.parametrize("bench, problem", [
    ({"steps": []}, "'steps' is a list, not an object"),
    ([], "a JSON list, not an object"),
    ({"settings": {}}, "no 'steps'"),
    ({"steps": {"cnn": []}}, "steps.cnn has no 'methods' object"),
    ({"steps": {"cnn": {"methods": {"fgsm": {"label": "FGSM"}}}}}, "steps.cnn.methods.fgsm has no text 'label'"),
])
def test_a_wrong_shaped_bench_json_is_one_line_naming_the_file_and_the_shape(tmp_path, capsys, bench, problem):
    write_run(tmp_path / "runs", [*FGSM, *PAPER], final_of(0.8, 0.4))
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    code = report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "reports"), "--bench", str(path)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and line.startswith(f"report.py: error: --bench {path} is not bench.py's output ({problem}")
    assert line.endswith(f"it should be {report.BENCH_SHAPE}")
    assert not (tmp_path / "reports").exists()


def with_autoattack(final: dict, last_aa: float, best_aa: float | None = None) -> dict:
    """final.json as train.py --final_autoattack writes it."""
    final = json.loads(json.dumps(final))
    final["last"]["aa_acc"] = last_aa
    if best_aa is not None:
        final["best"]["aa_acc"] = best_aa
    final["autoattack"] = {"attack": "autoattack", "attack_version": "standard"}
    return final


def test_autoattack_columns_and_the_gradient_masking_flag(tmp_path, capsys):
    # FGSM: PGD 40/42%, AutoAttack 38/41% (gap 1.5 points); GradAlign: PGD 50%, AutoAttack 30% (gap 20:
    # flagged; best weights 40 vs 35: exactly 5, not flagged); a second eps where one of two runs lacks
    # AutoAttack (an old final.json next to a new one).
    for seed, (pgd, aa_acc) in enumerate(((0.40, 0.38), (0.42, 0.41))):
        write_run(tmp_path, [*FGSM, f"--seed={seed}", *PAPER], with_autoattack(final_of(0.8, pgd, best=(0.7, 0.3)),
                                                                               aa_acc, 0.29))
    write_run(tmp_path, [*GRADALIGN, "--seed=0", *PAPER], with_autoattack(final_of(0.8, 0.5, best=(0.7, 0.4)),
                                                                          0.3, 0.35))
    write_run(tmp_path, [*FGSM, "--eps=16", "--seed=0", *PAPER], with_autoattack(final_of(0.8, 0.2), 0.2))
    write_run(tmp_path, [*FGSM, "--eps=16", "--seed=1", *PAPER], final_of(0.8, 0.2))
    rows = {(r["method"], r["eps"]): r for r in report.aggregate(report.collect_runs([str(tmp_path)]))}
    fgsm, ga, half = rows["FGSM", 8.0], rows["FGSM + GradAlign", 8.0], rows["FGSM", 16.0]
    assert fgsm["last_aa_mean"] == pytest.approx(39.5) and fgsm["last_aa_std"] == pytest.approx(1.5)
    assert fgsm["last_gap_mean"] == pytest.approx(1.5) and fgsm["best_gap_mean"] == pytest.approx(1.0)
    assert fgsm["masking"] == "" and fgsm["flags"] == "" and fgsm["n_aa"] == 2
    assert ga["last_gap_mean"] == pytest.approx(20.0) and ga["masking"] == "last"  # best: 5.0, not over 5
    assert (half["n_aa"], half["last_aa_mean"]) == (1, pytest.approx(20.0))
    assert "AutoAttack evaluated in 1 of 2 runs" in half["flags"]
    assert report.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| FGSM | 39.5 ± 1.5 | 20.0 ± 0.0 [1×1000] † |" in md
    assert "| FGSM + GradAlign | 20.0 ± 0.0 [1×1000] ‡ | – |" in md
    assert "| FGSM + GradAlign | 5.0 ± 0.0 [1×1000] | – |" in md
    assert "Possible gradient masking" in md and "FGSM + GradAlign, eps 8: PGD minus AutoAttack 20.0 points" in md
    with open(tmp_path / "out" / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == report.CSV_COLUMNS + report.AA_CSV_COLUMNS
    assert float(next(r for r in table if r["method"] == "FGSM + GradAlign")["last_gap_mean"]) == pytest.approx(20)
    assert (tmp_path / "out" / "robust_vs_eps_cifar10_resnet18.png").read_bytes()[:8] == PNG_MAGIC
    capsys.readouterr()


def _write_run(root, argv: list[str], pgd: float) -> None:
    cfg, defaults = train.parse_config(argv)
    name = train.run_name(cfg, defaults)
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, "config.json"), "w") as f:
        json.dump({**config.record(cfg), "run_name": name}, f)
    with open(os.path.join(root, name, "final.json"), "w") as f:
        json.dump({"last": {"clean_acc": 0.8, "pgd_acc": pgd, "cos_x_eta": 0.9}, "n_eval": 1000, "attack_iters": 50,
                   "n_restarts": 10, "eps": cfg.eps, "train_minutes": 1.0}, f)


def test_report_shows_both_protocols_side_by_side(tmp_path):
    common = ["--eps=8", "--n_final_eval=1000"]
    for seed, (paper_acc, own_acc) in enumerate(((0.40, 0.45), (0.42, 0.47))):
        _write_run(tmp_path, methods.flags("nfgsm", 8, "cifar10") + common + ["--half_prec", f"--seed={seed}"],
                   paper_acc)
        _write_run(tmp_path, methods.flags("nfgsm", 8, "cifar10", protocol="own") + common + [f"--seed={seed}"],
                   own_acc)
    _write_run(tmp_path, methods.flags("fgsm", 8, "cifar10") + common + ["--half_prec"], 0.0)
    runs = report.collect_runs([str(tmp_path)])
    assert all(r.counted for r in runs), [r.problem for r in runs if not r.counted]
    rows = report.aggregate(runs)
    assert [r["method"] for r in rows] == ["FGSM", "N-FGSM", "N-FGSM (own protocol)"]
    assert rows[1]["last_pgd_mean"] == pytest.approx(41.0) and rows[2]["last_pgd_mean"] == pytest.approx(46.0)
    assert rows[1]["flags"] == "" and rows[2]["flags"] == ""
    assert math.isfinite(rows[2]["last_clean_mean"])
