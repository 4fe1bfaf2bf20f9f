#!/usr/bin/env bash
# The later fast adversarial training methods beside the paper's, on scikit-learn's 8x8 digits
# (offline, CPU): FGSM, FGSM + GradAlign, PGD-10, N-FGSM, ELLE-A and ZeroGrad, 6 methods x 3 eps x
# 3 seeds = 54 runs, then report.py prints the tables, the robustness-vs-cost table among them
# (clean, PGD-50-10, cos_x_eta and cost per step of each method), and draws the robust-vs-eps curves.
#
# Its recipe is its own, NOT the current sh/demo_digits.sh recipe: the earlier demo recipe (the
# one-layer CNN with 8 filters, 100 epochs, GradAlign lambda 1.0, eps 25.5/51/76.5, seeds 0-2), with
# which the README's comparison table was measured. The method flags come from methods.py's table
# (GradAlign's lambda replaced by this recipe's).
#
# Env: SEEDS ("0 1 2"), EPS ("25.5 51 76.5", in 1/255 units), METHODS, JOBS (2), OUT (runs/compare_digits),
# REPORT (reports/compare_digits), DRY_RUN=1 prints the commands only. Extra arguments go to every train.py.
set -euo pipefail
shopt -s extglob  # the +(...) pattern below
cd "$(dirname "$0")/.."

# --- this comparison's recipe (the README's table was measured with it) ----------------------------------
SEEDS=${SEEDS:-"0 1 2"}
EPS=${EPS:-"25.5 51 76.5"}
RECIPE="--dataset=digits --model=cnn --n_filters_cnn=8 --epochs=100 --lr_max=0.005 --eval_iter_freq=50 --clamp_grad=half"
GRADALIGN_LAMBDA=1.0
# -------------------------------------------------------------------------------------------------------

METHODS=${METHODS:-"fgsm gradalign pgd10 nfgsm elle_a zerograd"}
JOBS=${JOBS:-2}
OUT=${OUT:-runs/compare_digits}
REPORT=${REPORT:-reports/compare_digits}

# Each method's flags from methods.py's table: the later methods with their papers' CIFAR-10 settings,
# unchanged for digits (README, "Other fast adversarial training methods"). An unknown method exits 2.
commands() {
  local -A method_flags=()
  local method eps rest grid
  grid=$(python methods.py grid --dataset digits --methods "$METHODS" --eps "$EPS") || exit 2
  while read -r method eps rest; do
    method_flags["$method $eps"]=${rest/--grad_align_cos_lambda=+([^ ])/--grad_align_cos_lambda=$GRADALIGN_LAMBDA}
  done <<< "$grid"
  for seed in $SEEDS; do for eps in $EPS; do for method in $METHODS; do
    echo "python train.py $RECIPE --device=cpu --out_dir=$OUT --eps=$eps ${method_flags["$method $eps"]} --seed=$seed $*"
  done; done; done
}

if [ "${DRY_RUN:-0}" = 1 ]; then commands "$@"; exit 0; fi
cmds=$(commands "$@")  # an unknown method stops the script here, before any run
# One thread per run: JOBS runs share the cores.
OMP_NUM_THREADS=1 python launch.py --jobs "$JOBS" --log_dir "$OUT/logs" <<< "$cmds"
python report.py "$OUT" --out "$REPORT"
