"""train.py --log_to: TensorBoard's event files and W&B's offline run hold metrics.jsonl's rows (each
scalar under its key, at step = iteration) and the final numbers, once each across a resume; without
the optional extra the flag is one line, exit 2, nothing written."""
from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import pytest

import tracking
import train
from tests.fixtures import RUN, TINY, Interrupt, one_line, read_json, read_metrics, run_dir_of, stop_after_epoch


def interrupted_then_resumed(tmp_path, monkeypatch, *flags: str) -> str:
    """RUN + flags stopped right after epoch 1's resume.pt, then relaunched to the end; its run directory."""
    args = RUN + ["--out_dir", str(tmp_path / "runs"), *flags]
    with monkeypatch.context() as patch, pytest.raises(Interrupt):
        stop_after_epoch(patch, 1)
        train.main(args)
    assert train.main(args) == 0
    return run_dir_of(tmp_path / "runs", args)


def expected_curves(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's rows as {key: [(iteration, value), ...]} for each scalar tracking streams."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in tracking.scalars(row).items():
            curves.setdefault(key, []).append((row["iteration"], value))
    return curves


def test_scalars_are_the_numeric_fields_by_key():
    row = {"iteration": 4, "epoch": 1, "lr": 0.01, "grad_norm_x": None, "filter_norms": [1.0], "flag": True,
           "cos_x_eta": float("nan")}
    assert tracking.scalars(row) == {"epoch": 1.0, "lr": 0.01}


# ------------------------------------------------------------------------------------- TensorBoard
def tensorboard_curves(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of run_dir/tensorboard as TensorBoard reads it (event files merged, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_metrics_jsonl_once_each_across_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    run_dir = interrupted_then_resumed(tmp_path, monkeypatch, "--log_to", "tensorboard")
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))) == 2  # one per process
    rows, got = read_metrics(run_dir), tensorboard_curves(run_dir)
    want = expected_curves(rows)
    assert [it for it, _ in got["test_pgd_acc"]] == [r["iteration"] for r in rows] == list(range(0, 13, 2))
    # TensorBoard stores float32: each value is metrics.jsonl's, rounded to float32
    assert {k: v for k, v in got.items() if not k.startswith("final/")} == {
        key: [(it, float(np.float32(v))) for it, v in points] for key, points in want.items()}
    final = read_json(os.path.join(run_dir, "final.json"))
    assert got["final/last/pgd_acc"] == [(12, float(np.float32(final["last"]["pgd_acc"])))]


# ------------------------------------------------------------------------------------------- W&B
def wandb_records(path: str) -> tuple[dict[int, dict], dict]:
    """The history rows ({step: {key: value}}, W&B's own '_' keys left out) and the last summary
    values of a .wandb file: LevelDB-log blocks (32 KiB, a 7-byte header per chunk) of Record protos."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            records.append(pending)
            pending = b""
    history, summary = {}, {}
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    return history, summary


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_jsonl_and_the_final_numbers(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    run_dir = interrupted_then_resumed(tmp_path, monkeypatch, "--log_to", "wandb")
    runs = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "*.wandb")), key=os.path.getmtime)
    with open(os.path.join(run_dir, tracking.WANDB_ID_FILE)) as f:
        run_id = f.read()
    assert runs and {os.path.basename(r) for r in runs} == {f"run-{run_id}.wandb"}  # one W&B run, resumed
    history, summary = wandb_records(runs[-1])  # the newest offline folder holds the whole curve
    rows = read_metrics(run_dir)
    assert history == {row["iteration"]: tracking.scalars(row) for row in rows}
    final = read_json(os.path.join(run_dir, "final.json"))
    assert summary["final/last/clean_acc"] == final["last"]["clean_acc"]
    assert summary["final/last/pgd_acc"] == final["last"]["pgd_acc"]


# ------------------------------------------------------------------------------ the missing extra
@pytest.mark.parametrize("kind", sorted(tracking.PACKAGES))
def test_log_to_without_its_package_is_one_line_exit_2_nothing_written(tmp_path, cli, monkeypatch, kind):
    monkeypatch.setattr(tracking, "installed", lambda package: package != tracking.PACKAGES[kind])
    proc = cli("train.py", *TINY, "--log_to", kind, "--out_dir", tmp_path / "runs")
    assert proc.code == 2
    assert one_line(proc.err) == (f"train.py: error: --log_to {kind} needs the {tracking.PACKAGES[kind]} package, "
                                  "an optional extra: run `pip install -r requirements-log.txt`")
    assert not os.path.exists(tmp_path / "runs")
