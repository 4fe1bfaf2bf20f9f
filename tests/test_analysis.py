"""analysis.py on a tiny finished CNN run: the plots and the Lemma 2 table."""
from __future__ import annotations

import csv
import os

import analysis
from tests.fixtures import run_train

PNG = b"\x89PNG\r\n\x1a\n"


def test_analysis_writes_plots_and_lemma2_table(tmp_path):
    run_dir = run_train(tmp_path, "--attack", "fgsm", "--attack_init", "zero")
    out = tmp_path / "analysis"
    assert analysis.main([run_dir, "--out", str(out), "--n_images", "32"]) == 0
    for name in ("filters.png", "feature_maps.png", "filter_norms.png", "lemma2.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    with open(out / "lemma2.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["width"]) for r in rows] == list(analysis.WIDTHS)
    assert all(-1 <= float(r["cos_x_eta_at_init"]) <= 1 for r in rows)
    assert "Lemma 2" in (out / "lemma2.md").read_text()


def test_analysis_refuses_a_resnet_run(tmp_path):
    run_dir = tmp_path / "fake"
    os.makedirs(run_dir)
    (run_dir / "config.json").write_text('{"model": "resnet18", "dataset": "cifar10"}')
    assert analysis.main([str(run_dir), "--out", str(tmp_path / "o")]) == 2
