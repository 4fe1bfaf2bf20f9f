"""Tables and figures of a sweep: the paper's Tables 4-5, Fig. 1/8 (robust accuracy vs eps) and
Fig. 2/11 (training curves), from run directories written by train.py.

    python report.py runs/ [more roots] --out reports/ [--curves RUN_DIR ...] [--runs-glob 'cifar10_*']

A run directory is any folder under a root holding config.json; runs without final.json (unfinished or
failed) are listed as skipped, and a final.json without config.json as damaged. Runs are grouped by
dataset, model, method and eps; each group's seeds give mean and std (population std, ddof=0) of the
final clean and PGD accuracy, in percent, for the last and the early-stopped ('best') weights. Writes
OUT/report.md, OUT/report.csv (one row per group), OUT/robust_vs_eps_<dataset>_<model>.png, and
OUT/curves.png with --curves. Groups whose evaluation
protocol differs from the paper's (1000 test points, PGD-50-10, no --debug) or within the group are
flagged with a dagger and explained under the tables. Runs trained with --final_autoattack add
AutoAttack tables (accuracy, and PGD minus AutoAttack per method and eps, from the runs that have
both); a mean gap over GAP_FLAG points is marked ‡ as possible gradient masking. Without such runs
the report and its CSV have no AutoAttack columns. A run trained with `train.py --methods_file` has
its file loaded again from config.json (a warning when it is missing or has changed; --methods_file
loads one first); a run whose method is then not registered is listed apart, not counted.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import os
import re
import sys
import types
from collections import Counter
from dataclasses import dataclass

import numpy as np

import config
import methods
import numerics
import rundir

STD_DDOF = 0  # population std over seeds, as numpy's np.std
PAPER_PROTOCOL = {"n_eval": 1000, "attack_iters": 50, "n_restarts": 10}
# Our offline demo data set is not in the paper: its protocol is its whole test set.
OWN_PROTOCOL = {"digits": {"n_eval": 397, "attack_iters": 50, "n_restarts": 10}}
# The paper's row order, then the later methods (methods.py); other methods follow alphabetically.
METHOD_ORDER = methods.ROW_ORDER
# config.json keys that do not change results (or are the group key / seed): the settings declared
# compare=False in config.py, and what train.py records beside the settings. The others must agree in a group.
NOT_COMPARED = {name for name, meta in config.FIELDS.items() if not meta["compare"]} | {
    "run_name", "argv", "git_commit", "torch_version", "device_used", "final_pgd", "numerics"}
CSV_COLUMNS = ["dataset", "model", "method", "eps", "n_seeds", "seeds", "n_eval", "attack_iters", "n_restarts",
               "last_clean_mean", "last_clean_std", "last_pgd_mean", "last_pgd_std",
               "best_clean_mean", "best_clean_std", "best_pgd_mean", "best_pgd_std", "n_best",
               "cos_x_eta_mean", "cos_x_eta_std", "train_minutes_mean", "flags"]
# Added when some run has AutoAttack (train.py --final_autoattack); gaps are PGD minus AutoAttack, in points.
AA_CSV_COLUMNS = ["n_aa", "last_aa_mean", "last_aa_std", "last_gap_mean", "last_gap_std",
                  "best_aa_mean", "best_aa_std", "best_gap_mean", "best_gap_std", "masking"]
GAP_FLAG = 5.0  # points of PGD minus AutoAttack above which a group is flagged as possible gradient masking


@dataclass(frozen=True)
class Run:
    """One run directory: its config.json, and final.json when it has finished (else None). A run
    with a damaged config.json or final.json, or whose config.json disagrees with final.json or with
    the folder's name, is not counted: `damaged` or `mismatch` says why, with the fix."""
    path: str
    config: dict
    final: dict | None
    damaged: str = ""
    mismatch: str = ""
    evals: tuple[dict, ...] = ()  # eval.py's re-evaluations (evals/*.json), by file name
    damaged_evals: tuple[str, ...] = ()  # the evals/ files skipped, with why
    unavailable: str = ""  # why its method cannot be named (not registered: methods.unavailable)
    methods_file: str = ""  # what is wrong with the methods file its config.json records, if anything

    @property
    def counted(self) -> bool:
        return self.final is not None and not self.damaged and not self.mismatch and not self.unavailable

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


# ------------------------------------------------------------------------------------------ reading
def read_metrics(run_dir: str) -> tuple[list[dict], list[int]]:
    """(the periodic evaluations of a run (metrics.jsonl), the numbers of the damaged lines skipped:
    not JSON objects with an iteration). A torn last line is left out silently (a crash mid-write)."""
    records, damaged = rundir.read_jsonl_records(os.path.join(run_dir, "metrics.jsonl"))
    kept = []
    for number, record in enumerate(records, 1):
        if isinstance(record.get("iteration"), int):
            kept.append(record)
        else:
            damaged.append(number)
    return kept, sorted(damaged)


def settings_namespace(settings: dict) -> tuple[types.SimpleNamespace, dict]:
    """config.json's settings as train.py's flags (unrecorded ones at their default), and those defaults."""
    import config as train_flags  # imports torch: only once some run is checked
    defaults = train_flags.resolved_defaults(settings)
    return types.SimpleNamespace(**{**defaults, **settings}), defaults


def expected_run_name(settings: dict) -> str:
    """The run name train.py gives these settings (config.json's), by rundir.run_name."""
    return rundir.run_name(*settings_namespace(settings))


def settings_mismatch(folder: str, settings: dict, final: dict) -> str:
    """How a finished run's config.json disagrees with its final.json (eps, run_name, settings_hash)
    or with its folder's name (derived from the settings), with the fix; '' when they agree."""
    problems = []
    eps = settings.get("eps")
    if not isinstance(eps, (int, float)) or float(eps) != float(final["eps"]):
        said = f"{eps:g}" if isinstance(eps, (int, float)) else repr(eps)
        problems.append(f"config.json says eps {said}, final.json {final['eps']:g}")
    name = os.path.basename(os.path.normpath(folder))
    try:
        expected = expected_run_name(settings)
        digest = rundir.settings_hash(settings_namespace(settings)[0])
    except (TypeError, ValueError) as exc:
        problems.append(f"its settings name no run ({exc})")
    else:
        if expected != name:
            problems.append(f"its settings name the run {expected}")
        # final.json (since it carries them) names the run and the settings it was trained with
        if final.get("run_name", name) != name:
            problems.append(f"final.json belongs to run {final['run_name']}")
        elif final.get("settings_hash", digest) != digest:
            problems.append("final.json's settings_hash is not that of config.json's settings")
    if not problems:
        return ""
    return ("; ".join(problems) + ": config.json was edited or the folder renamed; restore them (config.json's argv "
            "is the command) or rerun the command with --overwrite")


def read_run(folder: str) -> Run:
    """A run directory as report.py counts it (see Run)."""
    path = os.path.join(folder, "config.json")
    if not os.path.lexists(path):  # collect_runs found its final.json
        return Run(folder, {}, None, damaged=f"{path} is missing (final.json is there: the run finished, but its "
                                             f"settings are unknown); restore config.json, or {rundir.DAMAGED_FIX}")
    try:
        with open(path, "rb") as f:
            settings = json.loads(f.read())
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not whole JSON"
        return Run(folder, {}, None, damaged=f"{path} is unreadable ({why}); {rundir.DAMAGED_FIX}")
    if not isinstance(settings, dict):
        return Run(folder, {}, None, damaged=f"{path} is not train.py's (not a JSON object); {rundir.DAMAGED_FIX}")
    final, damage = rundir.read_final(folder)
    if damage:
        return Run(folder, settings, None, damaged=damage)
    # the methods file the run trained with (train.py --methods_file), loaded again from its record
    note = config.load_recorded(settings) or ""
    unavailable = methods.unavailable(types.SimpleNamespace(method=settings.get("method"),
                                                            methods_file=settings.get("methods_file"))) or ""
    if final is None or unavailable:
        return Run(folder, settings, final, unavailable=unavailable, methods_file=note)
    evals, damaged_evals = read_evals(folder)
    return Run(folder, settings, final, mismatch=settings_mismatch(folder, settings, final), evals=evals,
               damaged_evals=damaged_evals, methods_file=note)

# What an eval.py result must hold to be shown: its fields and what each must be.
EVAL_FIELDS = {"clean_acc": "a fraction", "pgd_acc": "a fraction", "eps": "a number", "n_eval": "a count",
               "attack_iters": "a count", "n_restarts": "a count", "weights": "'last' or 'best'"}


def eval_problem(result) -> str | None:
    """Why an evals/ file is not eval.py's result (one phrase), or None."""
    if not isinstance(result, dict):
        return "not a JSON object"
    for key, what in EVAL_FIELDS.items():
        value = result.get(key)
        if key == "weights":
            ok = value in ("last", "best")
        elif what == "a fraction":
            ok = rundir.is_number(value) and 0 <= value <= 1
        elif what == "a count":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = rundir.is_number(value)
        if not ok:
            return f"its {key} is not {what}"
    return None


def read_evals(run_dir: str) -> tuple[tuple[dict, ...], tuple[str, ...]]:
    """(eval.py's results in run_dir/evals/, each with its file name as 'file'; the files skipped as
    'path: why')."""
    folder = os.path.join(run_dir, rundir.EVALS_DIR)
    if not os.path.isdir(folder):
        return (), ()
    kept, skipped = [], []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue  # an atomic write's temporary file, or something else
        path = os.path.join(folder, name)
        result = rundir.read_json(path)
        problem = "unreadable or not whole JSON" if result is None else eval_problem(result)
        if problem:
            skipped.append(f"{path}: {problem}; rerun the eval.py command that wrote it, or remove the file")
        else:
            kept.append({**result, "file": name})
    return tuple(kept), tuple(skipped)


def collect_runs(roots: list[str], pattern: str = "*") -> list[Run]:
    """Every folder under the roots (a root may itself be a run) that holds config.json or final.json (a
    finished run that lost its config.json: damaged) and whose name matches the glob pattern, sorted by
    path. A folder that cannot be listed is named on stderr."""
    def unlisted(exc: OSError) -> None:
        print(f"report.py: warning: cannot list {exc.filename} ({exc.strerror}); its runs are left out",
              file=sys.stderr)

    runs = {}
    for root in roots:
        for folder, _, files in os.walk(root, onerror=unlisted):
            is_run = "config.json" in files or "final.json" in files
            if is_run and fnmatch.fnmatch(os.path.basename(os.path.normpath(folder)), pattern):
                runs[os.path.realpath(folder)] = read_run(folder)
    return sorted(runs.values(), key=lambda r: r.path)


# -------------------------------------------------------------------------------------- aggregating
OWN = " (own protocol)"  # after the method's name, for runs under its own paper's protocol (--protocol own)


def method_name(settings: dict) -> str:
    """The name of a run's training method, from its config.json (methods.py's registry), followed by
    OWN for a run under its paper's protocol, so that both protocols get rows side by side."""
    cfg = config.from_record(settings)
    return methods.label_of(cfg) + (OWN if cfg.protocol == "own" else "")


def passes_per_step(settings: dict) -> str:
    """A run's forward+backward passes per training step (methods.py's registry)."""
    return methods.passes_of(config.from_record(settings))


def model_name(settings: dict) -> str:
    """resnet18, or cnn-<layers>x<filters> (cnn_bn-<layers>x<filters>) for the small CNNs."""
    if settings.get("model") in ("cnn", "cnn_bn"):
        return f"{settings['model']}-{settings.get('n_layers', 1)}x{settings.get('n_filters_cnn', 16)}"
    return str(settings.get("model", "resnet18"))


def group_key(run: Run) -> tuple[str, str, str, float]:
    c = run.config
    return (str(c.get("dataset")), model_name(c), method_name(c), float(c.get("eps", 8)))


def method_rank(method: str) -> tuple[int, str]:
    """METHOD_ORDER's position (a method under its own protocol right after it), then the name."""
    base = method.removesuffix(OWN)
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std (ddof=STD_DDOF) of the values; NaN for an empty list."""
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=STD_DDOF))


def one_or_all(values: list) -> int | str:
    """The common value, or 'a/b' listing them when they differ."""
    distinct = sorted(set(values), key=str)
    return distinct[0] if len(distinct) == 1 else "/".join(str(v) for v in distinct)


def protocol_flags(runs: list[Run]) -> list[str]:
    """Why a group's numbers are not comparable with the paper's, or not with each other."""
    flags = []
    protocol = OWN_PROTOCOL.get(runs[0].config.get("dataset"), PAPER_PROTOCOL)
    for key, paper in protocol.items():
        values = sorted({r.final.get(key) for r in runs}, key=str)
        if values != [paper]:
            flags.append(f"{key} {'/'.join(map(str, values))} (paper: {paper})")
    if any(r.config.get("debug") for r in runs):
        flags.append("debug runs")
    differing = sorted(k for k in set().union(*(r.config for r in runs)) - NOT_COMPARED
                       if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1)
    if differing:
        flags.append("settings differ within the group: " + ", ".join(differing))
    repeated = sorted(s for s, n in Counter(r.config.get("seed") for r in runs).items() if n > 1)
    if repeated:
        flags.append(f"seeds counted more than once: {repeated}")
    n_best = sum("best" in r.final for r in runs)
    if 0 < n_best < len(runs):
        flags.append(f"early-stopped weights evaluated in {n_best} of {len(runs)} runs")
    n_aa = sum("aa_acc" in r.final["last"] for r in runs)
    if 0 < n_aa < len(runs):
        flags.append(f"AutoAttack evaluated in {n_aa} of {len(runs)} runs")
    recorded = [r.config.get("numerics") if isinstance(r.config.get("numerics"), dict) else {} for r in runs]
    numeric = [f"{key} {'/'.join(sorted({str(n[key]) for n in recorded if key in n}))}" for key in numerics.DECISIVE
               if len({json.dumps(n[key]) for n in recorded if key in n}) > 1]
    if numeric:
        flags.append("ran under different numerics (rounding differs): " + ", ".join(numeric))
    return flags


def aggregate(runs: list[Run]) -> list[dict]:
    """One row per (dataset, model, method, eps) over the finished runs: counts, mean and std of the
    accuracies in percent (last and early-stopped weights), final cos_x_eta, and protocol flags."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.counted:
            groups.setdefault(group_key(run), []).append(run)
    rows = []
    for (dataset, model, method, eps), members in groups.items():
        finals = [r.final for r in members]
        best = [f["best"] for f in finals if "best" in f]
        row = {"dataset": dataset, "model": model, "method": method, "eps": eps, "n_seeds": len(members),
               "passes": passes_per_step(members[0].config),
               "seeds": " ".join(str(r.config.get("seed"))
                                 for r in sorted(members, key=lambda r: r.config.get("seed"))),
               "n_eval": one_or_all([f.get("n_eval") for f in finals]),
               "attack_iters": one_or_all([f.get("attack_iters") for f in finals]),
               "n_restarts": one_or_all([f.get("n_restarts") for f in finals]), "n_best": len(best)}
        for prefix, results in (("last", [f["last"] for f in finals]), ("best", best)):
            for metric in ("clean", "pgd"):
                mean, std = mean_std([100 * r[f"{metric}_acc"] for r in results])
                row[f"{prefix}_{metric}_mean"], row[f"{prefix}_{metric}_std"] = mean, std
        row.update(autoattack_columns(finals))
        row["cos_x_eta_mean"], row["cos_x_eta_std"] = mean_std(
            [f["last"]["cos_x_eta"] for f in finals if f["last"].get("cos_x_eta") is not None])
        row["train_minutes_mean"] = mean_std([f["train_minutes"] for f in finals if "train_minutes" in f])[0]
        row["train_s_per_epoch_mean"] = mean_std([60 * r.final["train_minutes"] / max(int(r.config.get("epochs", 1)), 1)
                                                  for r in members if "train_minutes" in r.final])[0]
        row["flags"] = "; ".join(protocol_flags(members))
        rows.append(row)
    return sorted(rows, key=lambda r: (r["dataset"], r["model"], method_rank(r["method"]), r["eps"]))


def autoattack_columns(finals: list[dict]) -> dict:
    """AutoAttack accuracy (%) and the PGD-minus-AutoAttack gap (points) of the last and best weights, over
    the runs whose final.json has them; 'masking' names the weights whose mean gap exceeds GAP_FLAG."""
    row = {"n_aa": sum("aa_acc" in f["last"] for f in finals)}
    masking = []
    for prefix in ("last", "best"):
        results = [f[prefix] for f in finals if prefix in f and f[prefix].get("aa_acc") is not None]
        row[f"{prefix}_aa_mean"], row[f"{prefix}_aa_std"] = mean_std([100 * r["aa_acc"] for r in results])
        row[f"{prefix}_gap_mean"], row[f"{prefix}_gap_std"] = mean_std(
            [100 * (r["pgd_acc"] - r["aa_acc"]) for r in results])
        if row[f"{prefix}_gap_mean"] > GAP_FLAG + 1e-9:  # a gap of exactly 5 points (in floats) is not flagged
            masking.append(prefix)
    row["masking"] = " ".join(masking)
    return row


# ----------------------------------------------------------------------------------------- writing
def fmt_eps(eps: float) -> str:
    return f"{eps:g}"


def cell(row: dict | None, column: str, common: tuple) -> str:
    """'mean ± std', with [seeds×points] when those differ from the table's usual, † when flagged."""
    if row is None or np.isnan(row[f"{column}_mean"]):
        return "–"
    n = row["n_best"] if column.startswith("best") else row["n_seeds"]
    if column.endswith(("_aa", "_gap")):
        n = min(n, row["n_aa"])
    digits = 3 if column == "cos_x_eta" else 1
    text = f"{row[f'{column}_mean']:.{digits}f} ± {row[f'{column}_std']:.{digits}f}"
    if (n, row["n_eval"]) != common:
        text += f" [{n}×{row['n_eval']}]"
    if column.endswith("_gap") and column.split("_")[0] in row["masking"].split():
        text += " ‡"
    return text + (" †" if row["flags"] else "")


TABLES = [("last_pgd", "Robust accuracy, last weights"), ("last_clean", "Clean accuracy, last weights"),
          ("best_pgd", "Robust accuracy, early-stopped weights"),
          ("best_clean", "Clean accuracy, early-stopped weights"),
          ("cos_x_eta", "Gradient alignment cos(grad at x, grad at x + eta) of the last weights (final.json)")]
AA_TABLES = [("last_aa", "AutoAttack (standard) accuracy, last weights"),
             ("last_gap", "PGD minus AutoAttack (points), last weights"),
             ("best_aa", "AutoAttack (standard) accuracy, early-stopped weights"),
             ("best_gap", "PGD minus AutoAttack (points), early-stopped weights")]


def has_autoattack(rows: list[dict]) -> bool:
    return any(r.get("n_aa") for r in rows)


# What --bench reads of bench.py's output (the rest of the file is not used here).
BENCH_SHAPE = '{"steps": {MODEL: {"methods": {METHOD: {"label": TEXT, "units": NUMBER}}}}}'


def bench_problem(bench) -> str | None:
    """What keeps bench.py's output from giving units per step (not BENCH_SHAPE), or None."""
    if not isinstance(bench, dict):
        return f"a JSON {type(bench).__name__}, not an object"
    if "steps" not in bench:
        return "no 'steps': bench.py ran without --parts steps"
    steps = bench["steps"]
    if not isinstance(steps, dict):
        return f"'steps' is a {type(steps).__name__}, not an object"
    for model, part in steps.items():
        entries = part.get("methods") if isinstance(part, dict) else None
        if not isinstance(entries, dict):
            return f"steps.{model} has no 'methods' object"
        for method, entry in entries.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("label"), str)
                    and rundir.is_number(entry.get("units"))):
                return f"steps.{model}.methods.{method} has no text 'label' and number 'units'"
    return None


def bench_units(bench: dict | None, model: str) -> dict[str, float]:
    """Measured units per step of each method (by its name, spaces ignored) for this model from
    bench.py's bench.json (models cnn-LxF match bench's cnn); empty without one."""
    if not bench:
        return {}
    steps = bench.get("steps", {}).get(model.split("-")[0], {}).get("methods", {})
    return {m["label"].replace(" ", ""): m["units"] for m in steps.values()}


def plain(row: dict | None, column: str) -> str:
    """'mean ± std' of a column, or '–'."""
    if row is None or np.isnan(row[f"{column}_mean"]):
        return "–"
    digits = 3 if column == "cos_x_eta" else 1
    return f"{row[f'{column}_mean']:.{digits}f} ± {row[f'{column}_std']:.{digits}f}"


def cost_table(part: list[dict], methods: list[str], eps_values: list[float], bench: dict | None) -> list[str]:
    """Robustness vs cost: per method, its passes per step, measured training seconds per epoch (mean
    over its runs; relative to FGSM's when FGSM ran), units per step from bench.json when given, the
    robust accuracy at each eps, and clean accuracy and cos_x_eta at the largest eps."""
    by_key = {(r["method"], r["eps"]): r for r in part}
    seconds = {m: float(np.nanmean([by_key[m, e]["train_s_per_epoch_mean"] for e in eps_values if (m, e) in by_key]))
               for m in methods}
    units = bench_units(bench, part[0]["model"])
    top = eps_values[-1]
    head = ["method", "passes/step", "s/epoch", "× FGSM"] + (["units/step (bench.py)"] if units else [])
    head += [f"robust, eps {fmt_eps(e)}" for e in eps_values] + [f"clean, eps {fmt_eps(top)}",
                                                                 f"cos_x_eta, eps {fmt_eps(top)}"]
    legend = ("Passes: forward+backward passes per training step (f: forward only, dbl: double backprop); "
              "s/epoch: measured training time of these runs (evaluation excluded; the machine's load counts).")
    lines = ["### Robustness vs cost", "", legend, "", "| " + " | ".join(head) + " |",
             "|---|" + "---|" * (len(head) - 1)]
    fgsm = seconds.get("FGSM", float("nan"))
    passes = {r["method"]: r["passes"] for r in part}
    for m in methods:
        row = [m, passes[m], f"{seconds[m]:.2f}", "–" if np.isnan(fgsm) else f"{seconds[m] / fgsm:.1f}"]
        if units:
            u = units.get(m.replace(" ", ""))
            row.append(f"{u:.2f}" if u is not None else "–")
        row += [plain(by_key.get((m, e)), "last_pgd") for e in eps_values]
        row += [plain(by_key.get((m, top)), "last_clean"), plain(by_key.get((m, top)), "cos_x_eta")]
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def markdown(rows: list[dict], skipped: list[str] | None = None, bench: dict | None = None,
             not_counted: list[Run] = (), evaluated: list[Run] = ()) -> str:
    """The report as Markdown: per dataset and model, tables of methods (rows) by eps (columns), and
    the robustness-vs-cost table; then the runs left out (unfinished, damaged, mismatched)."""
    out = ["# Results", "",
           f"Accuracy in % on the first test points, mean ± std over seeds (population std, ddof={STD_DDOF}).", ""]
    for (dataset, model) in sorted({(r["dataset"], r["model"]) for r in rows}):
        part = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        methods = sorted({r["method"] for r in part}, key=method_rank)
        eps_values = sorted({r["eps"] for r in part})
        by_key = {(r["method"], r["eps"]): r for r in part}
        common = Counter((r["n_seeds"], r["n_eval"]) for r in part).most_common(1)[0][0]
        attack = Counter(f"PGD-{r['attack_iters']}-{r['n_restarts']}" for r in part).most_common(1)[0][0]
        legend = (f"Each cell: {common[0]} seeds × {common[1]} test points, robust accuracy under {attack}, "
                  "unless marked [seeds×points]; † marks a protocol difference (notes below).")
        out += [f"## {dataset}, {model}", "", legend, ""]
        for column, title in TABLES + (AA_TABLES if has_autoattack(part) else []):
            if not any(r["n_best"] for r in part) and column.startswith("best"):
                continue
            if column.startswith("best") and column.endswith(("_aa", "_gap")) and all(
                    np.isnan(r["best_aa_mean"]) for r in part):
                continue
            out += [f"### {title}", "", "| method | " + " | ".join(f"eps {fmt_eps(e)}" for e in eps_values) + " |",
                    "|---|" + "---|" * len(eps_values)]
            out += [f"| {m} | " + " | ".join(cell(by_key.get((m, e)), column, common) for e in eps_values) + " |"
                    for m in methods]
            out.append("")
        out += cost_table(part, methods, eps_values, bench)
        notes = [f"- {r['method']}, eps {fmt_eps(r['eps'])}: {r['flags']}" for r in part if r["flags"]]
        if notes:
            out += ["Notes (†):", "", *notes, ""]
        masked = [f"- {r['method']}, eps {fmt_eps(r['eps'])}: PGD minus AutoAttack "
                  + ", ".join(f"{r[f'{w}_gap_mean']:.1f} points ({w} weights)" for w in r["masking"].split())
                  for r in part if r.get("masking")]
        if masked:
            out += [f"Possible gradient masking (‡, PGD above AutoAttack by more than {GAP_FLAG:g} points):", "",
                    *masked, ""]
    out += evals_table(evaluated)
    if skipped:
        out += ["## Skipped (no final.json)", "", *[f"- {name}" for name in skipped], ""]
    damaged = [f"- {r.name}: {r.damaged}" for r in not_counted if r.damaged]
    if damaged:
        out += ["## Damaged (not counted)", "", *damaged, ""]
    mismatched = [f"- {r.name}: {r.mismatch}" for r in not_counted if r.mismatch]
    if mismatched:
        out += ["## Settings that do not match the run (not counted)", "", *mismatched, ""]
    unavailable = [f"- {r.name}: {r.unavailable}" for r in not_counted if r.unavailable]
    if unavailable:
        out += ["## Methods not available (not counted)", "", *unavailable, ""]
    return "\n".join(out)


AA_KEYS = {"aa_acc": "AutoAttack", "apgd_ce_acc": "APGD-CE", "apgd_t_acc": "APGD-T"}  # eval.py --attack's fields


def evals_table(runs: list[Run]) -> list[str]:
    """eval.py's re-evaluations of each run (its evals/) beside final.json's numbers of the same weights:
    robust accuracy at other eps, AutoAttack added later, 'best' against 'last'; then the evals/ files
    skipped as damaged."""
    pairs = [(run, result) for run in runs for result in run.evals]
    lines = []
    if pairs:
        lines += ["## Re-evaluations (eval.py, each run's evals/)", "",
                  "Accuracy in % of one run's saved weights; the last column is the run's own final evaluation "
                  "of the same weights (final.json, at its eps and points; = when the re-evaluation repeats it "
                  "and agrees).", "",
                  "| run | weights | attack | eps | points | clean | robust | AutoAttack | final.json clean / robust |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for run, e in pairs:
        attack = f"PGD-{e['attack_iters']}-{e['n_restarts']}" + (f" + {e['attack']}" if e.get("attack") else "")
        extra = next((f"{100 * e[k]:.1f} ({name})" for k, name in AA_KEYS.items() if rundir.is_number(e.get(k))),
                     "–")
        own = run.final.get(e["weights"]) if run.final else None
        if not isinstance(own, dict):
            versus = "–"
        elif e.get("final_json") is True:
            versus = "="
        else:
            versus = (f"{100 * own['clean_acc']:.1f} / {100 * own['pgd_acc']:.1f} "
                      f"(eps {fmt_eps(run.final['eps'])}, {run.final['n_eval']} points)")
        lines.append(f"| {run.name} | {e['weights']} | {attack} | {fmt_eps(e['eps'])} | {e['n_eval']} | "
                     f"{100 * e['clean_acc']:.1f} | {100 * e['pgd_acc']:.1f} | {extra} | {versus} |")
    if pairs:
        lines.append("")
    damaged = [f"- {problem}" for run in runs for problem in run.damaged_evals]
    if damaged:
        lines += ["## Damaged re-evaluations (skipped)", "", *damaged, ""]
    return lines


def write_markdown(rows: list[dict], path: str, skipped: list[str] | None = None, bench: dict | None = None,
                   not_counted: list[Run] = (), evaluated: list[Run] = ()) -> str:
    rundir.atomic_write_bytes(path, markdown(rows, skipped, bench, not_counted, evaluated).encode())
    return path


def write_csv(rows: list[dict], path: str) -> str:
    """One row per group; accuracies in %, NaN as an empty field."""
    def value(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.4f}"
        return v
    columns = CSV_COLUMNS + (AA_CSV_COLUMNS if has_autoattack(rows) else [])
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: value(row[k]) for k in columns})
    rundir.atomic_write_bytes(path, text.getvalue().encode())
    return path


# ----------------------------------------------------------------------------------------- figures
def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str) -> None:
    """Saves a figure as PNG through rundir.atomic_write_bytes (an interruption leaves no torn file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    pyplot().close(fig)
    rundir.atomic_write_bytes(path, buffer.getvalue())


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")


def plot_robust_vs_eps(rows: list[dict], out_dir: str) -> list[str]:
    """Fig. 1 / Fig. 8: robust accuracy (%) vs eps per method, a band of ±1 std over seeds; one PNG per
    dataset and model, with a second panel for the early-stopped weights when they were evaluated.
    Runs with AutoAttack add its mean as a dashed line of the method's colour."""
    plt = pyplot()
    paths = []
    for (dataset, model) in sorted({(r["dataset"], r["model"]) for r in rows}):
        part = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        panels = [("last_pgd", "last weights")] + ([("best_pgd", "early-stopped weights")]
                                                   if any(r["n_best"] for r in part) else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
        for ax, (column, title) in zip(axes[0], panels):
            for method in sorted({r["method"] for r in part}, key=method_rank):
                mine = [r for r in part if r["method"] == method and not np.isnan(r[f"{column}_mean"])]
                if not mine:
                    continue
                eps = np.array([r["eps"] for r in mine])
                mean = np.array([r[f"{column}_mean"] for r in mine])
                std = np.array([r[f"{column}_std"] for r in mine])
                line, = ax.plot(eps, mean, marker="o", label=method)
                ax.fill_between(eps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
                aa_column = column.replace("_pgd", "_aa")
                with_aa = [r for r in mine if not np.isnan(r.get(f"{aa_column}_mean", np.nan))]
                if with_aa:  # AutoAttack of the same runs, dashed, in the method's colour
                    ax.plot([r["eps"] for r in with_aa], [r[f"{aa_column}_mean"] for r in with_aa], marker="x",
                            linestyle="--", color=line.get_color(), label=f"{method} (AutoAttack)")
            ax.set(title=f"{dataset}, {model}: {title}", xlabel="eps (1/255)",
                   ylabel="PGD accuracy (%)" + (", AutoAttack dashed" if has_autoattack(part) else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"robust_vs_eps_{slug(dataset)}_{slug(model)}.png")
        save_figure(fig, path)
        paths.append(path)
    return paths


CURVE_PANELS = [("train_pgd_acc", "PGD accuracy, training subset (%)", 100),
                ("test_pgd_acc", "PGD accuracy, test subset (%)", 100),
                ("test_fgsm_acc", "FGSM accuracy, test subset (%)", 100),
                ("cos_x_eta", "cos(grad at x, grad at x + eta)", 1),
                ("cos_fgsm_pgd", "cos(FGSM delta, PGD delta)", 1)]


def curve_label(run_dir: str) -> str:
    c = rundir.read_json(os.path.join(run_dir, "config.json"))
    if not isinstance(c, dict) or c.get("method", None) not in (None, *methods.REGISTRY):
        return os.path.basename(os.path.normpath(run_dir))
    return f"{method_name(c)}, eps {float(c.get('eps', 8)):g}, seed {c.get('seed')}"


def plot_curves(run_dirs: list[str], path: str) -> str:
    """Fig. 2 / Fig. 11: metrics.jsonl of each run vs the training iteration, one colour per run; a
    sixth panel shows the first-layer filter norms when the runs logged them (the CNN)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    axes = axes.ravel()
    any_norms = False
    for i, run_dir in enumerate(run_dirs):
        records, damaged = read_metrics(run_dir)
        if damaged:
            print(f"report.py: warning: {os.path.join(run_dir, 'metrics.jsonl')}: skipped {len(damaged)} damaged "
                  f"line(s) ({', '.join(map(str, damaged[:5]))}{', ...' if len(damaged) > 5 else ''}); "
                  "the curves leave them out", file=sys.stderr)
        color = f"C{i % 10}"
        it = [r["iteration"] for r in records]
        for ax, (key, title, scale) in zip(axes, CURVE_PANELS):
            ax.plot(it, [scale * r[key] if r.get(key) is not None else np.nan for r in records], color=color,
                    marker="o", markersize=2, label=curve_label(run_dir))
            ax.set(title=title, xlabel="iteration")
        norms = [r["filter_norms"] for r in records if r.get("filter_norms")]
        if norms and len(norms) == len(records):
            axes[5].plot(it, norms, color=color, linewidth=1)
            any_norms = True
    axes[5].set(title="first-layer filter L2 norms (CNN)", xlabel="iteration")
    axes[5].set_visible(any_norms)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return path


# --------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="*", help="folders holding run directories (searched recursively)")
    p.add_argument("--out", default="reports", help="output folder")
    p.add_argument("--curves", nargs="+", default=[], metavar="RUN_DIR", help="runs whose training curves to plot")
    p.add_argument("--runs-glob", dest="runs_glob", default="*", help="only run directories whose name matches")
    p.add_argument("--bench", default=None, metavar="BENCH_JSON",
                   help="bench.py's output: adds its measured units per step to the robustness-vs-cost table")
    config.add_flags(p, ["methods_file"], helps={"methods_file": "a Python file that registers methods, loaded "
                                                "before the runs (each run's config.json names its own file too)"})
    return p


def input_problem(args: argparse.Namespace) -> str | None:
    """The first problem with the roots, --curves, --bench or --out, as one line naming the fix, or None."""
    for root in args.roots:
        if not os.path.isdir(root):
            return f"root {root} {'is not a folder' if os.path.exists(root) else 'does not exist'}; check the path"
    for run_dir in args.curves:
        if not os.path.isdir(run_dir):
            return f"--curves {run_dir}: no such run directory; give a folder written by train.py"
        if not os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            return f"--curves {run_dir}: it has no metrics.jsonl; give a folder written by train.py"
    if args.bench:
        bench = rundir.read_json(args.bench)
        if bench is None:
            return f"--bench {args.bench}: not a readable JSON file; run python bench.py first"
        problem = bench_problem(bench)
        if problem:
            return f"--bench {args.bench} is not bench.py's output ({problem}); it should be {BENCH_SHAPE}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out {args.out} is a file, not a folder; give a folder"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.roots and not args.curves:
        build_parser().error("give at least one ROOT or --curves RUN_DIR")
    problem = input_problem(args)  # all before anything is written
    try:
        if problem is None and args.methods_file is not None:
            config.load_methods(args.methods_file)
    except ValueError as exc:
        problem = str(exc)
    if problem:
        print(f"report.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        return write_report(args)
    except KeyboardInterrupt:
        return rundir.interrupted("report.py", "every file written so far is whole (each replaces the old at once)")


def write_report(args: argparse.Namespace) -> int:
    runs = collect_runs(args.roots, args.runs_glob)
    for note in dict.fromkeys(r.methods_file for r in runs if r.methods_file):  # each once, in order
        print(f"report.py: warning: {note}", file=sys.stderr)
    for run in runs:
        if run.unavailable:
            print(f"report.py: warning: {run.name} is not counted: {run.unavailable}", file=sys.stderr)
    skipped = [r.name for r in runs if r.final is None and not r.damaged and not r.unavailable]
    not_counted = [r for r in runs if r.damaged or r.mismatch or r.unavailable]
    rows = aggregate(runs)
    bench = rundir.read_json(args.bench) if args.bench else None
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        print(f"report.py: error: cannot create --out {args.out} ({exc.strerror}); give a writable folder",
              file=sys.stderr)
        return 2
    if args.roots:
        evaluated = [r for r in runs if r.evals or r.damaged_evals]
        for run in evaluated:
            for problem in run.damaged_evals:
                print(f"report.py: warning: skipped {problem}", file=sys.stderr)
        print(markdown(rows, skipped, bench, not_counted, evaluated))
        written = [write_markdown(rows, os.path.join(args.out, "report.md"), skipped, bench, not_counted, evaluated),
                   write_csv(rows, os.path.join(args.out, "report.csv"))]
        written += plot_robust_vs_eps(rows, args.out)
        counted = sum(r.counted for r in runs)
        print(f"{counted} finished runs in {len(rows)} groups, {len(skipped)} skipped"
              + (f", {len(not_counted)} not counted (damaged, mismatched or of a method not available: listed "
                 "in report.md)" if not_counted
                 else ""))
    else:
        written = []
    if args.curves:
        written.append(plot_curves(args.curves, os.path.join(args.out, "curves.png")))
    print("wrote " + ", ".join(written))
    return 0 if rows or args.curves else 1


if __name__ == "__main__":
    sys.exit(main())
