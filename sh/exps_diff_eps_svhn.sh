#!/usr/bin/env bash
# SVHN, PreAct ResNet-18, eps 1..12/255 (the paper's Fig. 8 and Table 5):
# 6 methods x 12 eps x 5 seeds = 360 runs of 15 epochs (Free-AT: 45 epochs), lr_max 0.05 (Free-AT 0.01).
#   DRY_RUN=1 sh/exps_diff_eps_svhn.sh                         # print the 360 commands
#   JOBS=4 sh/exps_diff_eps_svhn.sh --data_dir=/data --out_dir=runs/svhn
#   METHODS="gradalign pgd10" EPS="8 12" SEEDS="0 1" sh/exps_diff_eps_svhn.sh
# Methods: the paper's (`python sweep.py list --paper`); their flags, the schedule and GradAlign's lambda
# per eps are in methods.py. The other variables are in sh/commands.sh.
# The authors' GradAlign lines pass --lr_max=0.30 --lr_max=0.05 (argparse keeps the last): we pass
# 0.05 once. Relaunching skips finished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source sh/commands.sh

ALL_METHODS=$(sweep_py list --paper)
METHODS=${METHODS:-$ALL_METHODS}
EPS=${EPS:-$(seq -s " " 1 12)}
COMMON="--eval_iter_freq=200 --batch_size_eval=1024 --half_prec --eval_early_stopped_model --n_final_eval=1000"

commands() { eps_grid svhn; }

collect_extra "$@"
check_methods
sweep commands
