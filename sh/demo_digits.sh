#!/usr/bin/env bash
# The paper and its successors in miniature on scikit-learn's 8x8 digits (offline, CPU): FGSM,
# FGSM-RS, FGSM + GradAlign, PGD-10, N-FGSM, ZeroGrad, MultiGrad, ELLE and ELLE-A with a single-layer
# CNN at eps 76.5/255, seeds 5-9 (9 methods x 5 seeds = 45 runs), then report.py prints the tables (clean,
# PGD-50-10, cos_x_eta, cost per step) and draws the training curves of the first seed.
# The shared recipe is recipes/digits_demo.args (chosen by sh/search_digits.sh on seeds 0-4, which
# seeds 5-9 never saw: docs/search_digits.md); each method's flags come from methods.py's table.
#
# Env: SEEDS ("5 6 7 8 9"), EPS ("76.5", in 1/255 units), METHODS (all nine), JOBS (2),
# OUT (runs/demo_digits), REPORT (reports/demo_digits), DRY_RUN=1 prints the commands only,
# METHODS_FILE (a file of more methods, as in sh/commands.sh).
# Extra arguments go to every train.py, after the recipe and the method's flags (so they override both).
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=recipes/digits_demo.args
SEEDS=${SEEDS:-"5 6 7 8 9"}
EPS=${EPS:-"76.5"}
METHODS=${METHODS:-"fgsm fgsm_rs gradalign pgd10 nfgsm zerograd multigrad elle elle_a"}
JOBS=${JOBS:-2}
OUT=${OUT:-runs/demo_digits}
REPORT=${REPORT:-reports/demo_digits}
source sh/commands.sh  # sweep_py and METHODS_FILE's flag (SEEDS keeps this script's default)

commands() {
  local -A method_flags=()
  local method eps rest grid
  grid=$(sweep_py grid --dataset digits --methods "$METHODS" --eps "$EPS") || exit 2
  while read -r method eps rest; do  # the flags of each method at each eps, from methods.py's table
    method_flags["$method $eps"]=$rest
  done <<< "$grid"
  for seed in $SEEDS; do for eps in $EPS; do for method in $METHODS; do
    echo "python train.py ${METHODS_FILE_ARGS[*]+${METHODS_FILE_ARGS[*]} }@$RECIPE --out_dir=$OUT --eps=$eps" \
      "${method_flags["$method $eps"]} --seed=$seed $*"
  done; done; done
}

if [ "${DRY_RUN:-0}" = 1 ]; then commands "$@"; exit 0; fi
cmds=$(commands "$@")  # an unknown method stops the script here, before any run
# One thread per run: JOBS runs share the cores.
OMP_NUM_THREADS=1 python launch.py --jobs "$JOBS" --log_dir "$OUT/logs" <<< "$cmds"
# Training curves (Fig. 2 in miniature) of the first seed at the largest eps.
largest=$(printf '%s\n' $EPS | sort -g | tail -1)
first_seed=$(printf '%s\n' $SEEDS | head -1)
curves=$(ls -d "$OUT"/digits_cnn_*_eps${largest}_*_seed${first_seed} 2>/dev/null || true)
python report.py "$OUT" --out "$REPORT" ${METHODS_FILE_ARGS[@]+"${METHODS_FILE_ARGS[@]}"} ${curves:+--curves $curves}
