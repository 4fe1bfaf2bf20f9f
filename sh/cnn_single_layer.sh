#!/usr/bin/env bash
# Catastrophic overfitting in a single-layer CNN with 4 filters (the paper's Sec. 3 and Fig. 3,
# docs/methods.md, "What the paper shows"): CIFAR-10, FGSM at eps 10/255 from a zero start, Adam lr 0.003, 30 epochs,
# evaluated every 50 iterations; with and without GradAlign (lambda 0.356 = 0.02 * 10^(10/8), the
# CIFAR-10 formula at eps 10). No --half_prec, as in the authors' README command.
#   DRY_RUN=1 sh/cnn_single_layer.sh                           # print the 10 commands
#   METHODS=fgsm SEEDS=0 sh/cnn_single_layer.sh --data_dir=/data
# Methods: fgsm gradalign; the other variables are in sh/commands.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/commands.sh

ALL_METHODS="fgsm gradalign"
METHODS=${METHODS:-$ALL_METHODS}
COMMON="--dataset=cifar10 --model=cnn --n_layers=1 --n_filters_cnn=4 --attack=fgsm --eps=10 --attack_init=zero"
COMMON+=" --epochs=30 --eval_iter_freq=50 --lr_max=0.003 --n_final_eval=1000"

commands() {
  local seed method lambda
  for seed in $SEEDS; do
    for method in $METHODS; do
      lambda=0
      if [[ $method == gradalign ]]; then lambda=$(python sweep.py lambda --dataset cifar10 --eps 10); fi
      emit "$COMMON --grad_align_cos_lambda=$lambda --seed=$seed"
    done
  done
}

collect_extra "$@"
check_methods
sweep commands
