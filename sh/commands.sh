# shellcheck shell=bash
# Helpers sourced by the sweep scripts in sh/; not meant to be run on its own.
#
# Environment of every sweep script:
#   DRY_RUN=1      print the train.py commands, one per line, and run nothing
#   STATUS=1       run nothing: print how many of the runs are finished, in progress, interrupted, failed
#                  or not started, naming the unfinished ones (launch.py --status; LAUNCHER_ARGS apply)
#   SEEDS          seeds to run (default "0 1 2 3 4": the paper averages 5 seeds)
#   METHODS, EPS   subsets of the script's methods and eps values (1/255 units)
#   EXTRA          train.py flags appended to every command (split at spaces), as are the script's arguments
#   JOBS           runs at once on this machine (default 1); LAUNCHER_ARGS: more launch.py flags (e.g. --slurm)
#   PYTHON         interpreter that runs launch.py (default python)

SEEDS=${SEEDS:-"0 1 2 3 4"}

# collect_extra ARG...: sets EXTRA_ARGS to $EXTRA and ARG..., each shell-quoted, with a leading space.
collect_extra() {
  local words arg
  read -r -a words <<< "${EXTRA:-}"
  EXTRA_ARGS=""
  for arg in ${words[@]+"${words[@]}"} "$@"; do EXTRA_ARGS+=" $(printf '%q' "$arg")"; done
}

# check_methods: exits with code 2 unless every word of $METHODS is in $ALL_METHODS.
check_methods() {
  local m
  for m in $METHODS; do
    if [[ " $ALL_METHODS " != *" $m "* ]]; then
      echo "$0: unknown method '$m' in METHODS (choose from: $ALL_METHODS)" >&2
      exit 2
    fi
  done
}

# decimals3 EXPR: an awk expression in e (the eps of the run), printed with 3 decimals.
decimals3() { awk -v e="$1" "BEGIN { printf \"%.3f\", $2 }"; }

# ratio A B: A / B as a plain number (8 / 5 -> 1.6, 8 / 2 -> 4).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%g", a / b }'; }

# method_flags METHOD EPS: the method's train.py flags at EPS (SPEC §5), from the script's settings
# EPOCHS, LR_MAX, GA_LR_MAX, FREE_EPOCHS, FREE_LR_MAX and its function gradalign_lambda EPS.
method_flags() {
  local eps=$2 schedule="--epochs=$EPOCHS --lr_max=$LR_MAX"
  case $1 in
    fgsm) echo "--attack=fgsm --attack_init=zero $schedule" ;;
    fgsm_rs) echo "--attack=fgsm --attack_init=random $schedule" ;;  # fgsm_alpha stays 1.25
    gradalign) echo "--attack=fgsm --attack_init=zero --grad_align_cos_lambda=$(gradalign_lambda "$eps")" \
                    "--epochs=$EPOCHS --lr_max=$GA_LR_MAX" ;;
    pgd2) echo "--attack=pgd --attack_init=zero --pgd_train_n_iters=2 --pgd_alpha_train=$(ratio "$eps" 2) $schedule" ;;
    pgd10) echo "--attack=pgd --attack_init=zero --pgd_train_n_iters=10 --pgd_alpha_train=$(ratio "$eps" 5) $schedule" ;;
    free_at) echo "--attack=fgsm --attack_init=zero --fgsm_alpha=1.0 --minibatch_replay=8" \
                  "--epochs=$FREE_EPOCHS --lr_max=$FREE_LR_MAX" ;;
  esac
}

# eps_grid DATASET: every (seed, method, eps) command of an eps sweep on DATASET, in that loop order.
eps_grid() {
  local seed method eps
  for seed in $SEEDS; do
    for method in $METHODS; do
      for eps in $EPS; do
        emit "--dataset=$1 $(method_flags "$method" "$eps") --eps=$eps $COMMON --seed=$seed"
      done
    done
  done
}

# emit FLAGS: prints one train.py command line, the extra arguments appended.
emit() { printf 'python train.py %s%s\n' "$*" "$EXTRA_ARGS"; }

# sweep FUNCTION: prints FUNCTION's commands (DRY_RUN=1), their runs' states (STATUS=1), or feeds them
# to launch.py on stdin.
sweep() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    "$1"
    return
  fi
  if [[ ${STATUS:-0} == 1 ]]; then
    # shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of flags
    "$1" | "${PYTHON:-python}" launch.py --status ${LAUNCHER_ARGS:-}
    return
  fi
  # shellcheck disable=SC2086  # LAUNCHER_ARGS is a list of flags
  "$1" | "${PYTHON:-python}" launch.py --jobs "${JOBS:-1}" ${LAUNCHER_ARGS:-}
}
