#!/usr/bin/env bash
# The successor methods beside the paper's, on the digits demo (offline, CPU):
# FGSM, FGSM + GradAlign, PGD-10, N-FGSM, ELLE-A and ZeroGrad with the demo's recipe, eps grid and seeds
# (6 methods x 3 eps x 3 seeds = 54 runs), then report.py prints the tables, the robustness-vs-cost
# table among them (clean, PGD-50-10, cos_x_eta and cost per step of each method), and draws
# the robust-vs-eps curves.
#
# Env: SEEDS ("0 1 2"), EPS ("25.5 51 76.5", in 1/255 units), METHODS, JOBS (2), OUT (runs/compare_digits),
# REPORT (reports/compare_digits), DRY_RUN=1 prints the commands only. Extra arguments go to every train.py.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- the digits demo's recipe, as in sh/demo_digits.sh (change both together) -------------------------
SEEDS=${SEEDS:-"0 1 2"}
EPS=${EPS:-"25.5 51 76.5"}
RECIPE="--dataset=digits --model=cnn --n_filters_cnn=8 --epochs=100 --lr_max=0.005 --eval_iter_freq=50 --clamp_grad=half"
GRADALIGN_LAMBDA=1.0
# -------------------------------------------------------------------------------------------------------

ALL_METHODS="fgsm gradalign pgd10 nfgsm elle_a zerograd"
METHODS=${METHODS:-$ALL_METHODS}
JOBS=${JOBS:-2}
OUT=${OUT:-runs/compare_digits}
REPORT=${REPORT:-reports/compare_digits}

# Each method's paper settings at CIFAR-10 scale, unchanged for digits (README, "Other fast adversarial
# training methods"): N-FGSM k = 2 and step eps; ELLE-A lambda_max 4000 on FGSM with step eps;
# ZeroGrad q = 0.35 on FGSM-RS with step 2 eps.
method_flags() {  # $1 method, $2 eps (1/255 units)
  case $1 in
    fgsm) echo "--attack=fgsm --attack_init=zero" ;;
    gradalign) echo "--attack=fgsm --attack_init=zero --grad_align_cos_lambda=$GRADALIGN_LAMBDA" ;;
    pgd10) echo "--attack=pgd --attack_init=zero --pgd_train_n_iters=10 --pgd_alpha_train=$(awk -v e="$2" 'BEGIN { printf "%g", e / 5 }')" ;;
    nfgsm) echo "--attack=nfgsm --fgsm_alpha=1.0 --nfgsm_noise_mult=2" ;;
    elle_a) echo "--attack=fgsm --attack_init=zero --fgsm_alpha=1.0 --elle_lambda=4000 --elle_adaptive" ;;
    zerograd) echo "--attack=fgsm --attack_init=random --fgsm_alpha=2.0 --zerograd_q=0.35" ;;
    *) echo "$0: unknown method '$1' (choose from: $ALL_METHODS)" >&2; exit 2 ;;
  esac
}

commands() {
  for seed in $SEEDS; do for eps in $EPS; do for method in $METHODS; do
    echo "python train.py $RECIPE --device=cpu --out_dir=$OUT --eps=$eps $(method_flags "$method" "$eps") --seed=$seed $*"
  done; done; done
}

for method in $METHODS; do method_flags "$method" 8 > /dev/null; done  # unknown names fail before any run
if [ "${DRY_RUN:-0}" = 1 ]; then commands "$@"; exit 0; fi
# One thread per run: JOBS runs share the cores.
commands "$@" | OMP_NUM_THREADS=1 python launch.py --jobs "$JOBS" --log_dir "$OUT/logs"
python report.py "$OUT" --out "$REPORT"
