#!/usr/bin/env bash
# CIFAR-10, PreAct ResNet-18, eps 1..16/255 (the paper's Fig. 1 and Table 4):
# 6 methods x 16 eps x 5 seeds = 480 runs of 30 epochs (Free-AT: 96 epochs of replayed batches).
#   DRY_RUN=1 sh/exps_diff_eps_cifar10.sh                      # print the 480 commands
#   JOBS=4 sh/exps_diff_eps_cifar10.sh --data_dir=/data --out_dir=runs/cifar10
#   METHODS="fgsm gradalign" EPS="8 16" SEEDS=0 sh/exps_diff_eps_cifar10.sh
# Methods: `python sweep.py list` (fgsm fgsm_rs gradalign pgd2 pgd10 free_at, the default: the
# paper's; then the successors, each with its paper's settings). Their flags, the schedule (30 epochs,
# lr_max 0.2; GradAlign 0.30; Free-AT 96 epochs at 0.04) and each method's lambda per eps are in
# methods.py, e.g.
#   METHODS="nfgsm elle_a zerograd" EPS="8 16" sh/exps_diff_eps_cifar10.sh --data_dir=/data
# PROTOCOL=own runs each method under its own paper's protocol instead of this paper's (methods.py's
# Protocol; docs/later_methods.md): the later methods with --protocol=own in fp32 on their authors'
# network (--model=...: their schedule's peak, input normalisation and augmentation, ELLE's last clean
# forward), the paper's methods as above, --half_prec included (their runs are the same runs, so they
# are skipped once done), e.g.
#   PROTOCOL=own METHODS="nfgsm zerograd multigrad elle elle_a" DRY_RUN=1 sh/exps_diff_eps_cifar10.sh
# The other variables are in sh/commands.sh.
# Commands run from the repository root (relative paths in the flags are relative to it). Relaunching
# skips finished runs: train.py exits at once when the run's final.json exists.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/commands.sh

PAPER_METHODS=$(sweep_py list --paper)
ALL_METHODS=$(sweep_py list)
METHODS=${METHODS:-$PAPER_METHODS}
EPS=${EPS:-$(seq -s " " 1 16)}
COMMON="--eval_iter_freq=200 --batch_size_eval=1024 --half_prec --eval_early_stopped_model --n_final_eval=1000"

commands() { eps_grid cifar10; }

# Under PROTOCOL=own each method carries the words of its own protocol (sweep.py grid --protocol own),
# which include the precision that COMMON then leaves out.
case ${PROTOCOL:-paper} in
  paper) ;;
  own) COMMON=${COMMON/ --half_prec/}; commands() { eps_grid cifar10 --protocol own; } ;;
  *) echo "$0: unknown PROTOCOL '$PROTOCOL' (choose paper or own)" >&2; exit 2 ;;
esac

collect_extra "$@"
check_methods
sweep commands
