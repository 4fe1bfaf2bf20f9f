"""What one train.py run costs, counted from its settings alone: training steps, forward+backward
passes (methods.py's passes per step) and the evaluations' passes. train.py says it at start-up,
config.py bounds it, sweep_cost.py adds it up over a sweep.

The config argument is config.Config (this module needs only its fields, so it imports no config).
"""
from __future__ import annotations

import data
import methods

FINAL_PASSES_PER_POINT = 50 * 10  # PGD-50-10 without its early exit: the most it can make


def pass_count(passes: str) -> int:
    """'3+dbl' -> 4, '10+f+1' -> 12: the terms of methods.py's passes per step, a named term (a double
    backprop, a forward-only pass) counted as one."""
    return sum(int(t) if t.isdigit() else 1 for t in passes.split("+"))


def training_steps(cfg) -> int:
    """Epoch 0's one step, then epochs x the whole batches of the training split."""
    batches = data.DATASETS[cfg.dataset].n_train // cfg.batch_size if cfg.dataset in data.DATASETS else 0
    return 1 + cfg.epochs * batches


def periodic_evaluations(cfg) -> int:
    """How many periodic evaluations a run makes (one every eval_iter_freq steps, the first at step 0)."""
    return (training_steps(cfg) - 1) // cfg.eval_iter_freq + 1 if cfg.eval_iter_freq > 0 else 0


def run_cost(cfg) -> dict:
    """Steps and forward+backward passes (batch passes for training, point passes for evaluation)."""
    steps = training_steps(cfg)
    n_periodic = periodic_evaluations(cfg)
    subset = cfg.n_eval_every_k_iter // cfg.batch_size * cfg.batch_size  # whole batches
    periodic_points = n_periodic * (cfg.n_eval_every_k_iter * (1 + cfg.attack_iters + 2) + subset * cfg.attack_iters)
    n_weights = 2 if cfg.eval_early_stopped_model else 1
    final_points = n_weights * cfg.n_final_eval * FINAL_PASSES_PER_POINT
    return {"label": methods.label_of(cfg), "passes": methods.passes_of(cfg), "steps": steps,
            "train_passes": steps * pass_count(methods.passes_of(cfg)),
            "eval_point_passes": periodic_points + final_points, "batch_size": cfg.batch_size}
