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
#   METHODS_FILE   a Python file that registers more methods (train.py --methods_file; absolute, or relative
#                  to where the script was started): METHODS may name its recipes, every command loads it

SEEDS=${SEEDS:-"0 1 2 3 4"}

# $METHODS_FILE as sweep.py's and train.py's flag (none without it); the scripts cd to the repository
# root first, so a relative path is taken from the folder they were started in ($OLDPWD).
METHODS_FILE_ARGS=()
if [[ -n ${METHODS_FILE:-} ]]; then
  [[ $METHODS_FILE == /* ]] || METHODS_FILE="$OLDPWD/$METHODS_FILE"
  METHODS_FILE_ARGS=("--methods_file=$METHODS_FILE")
fi

# sweep_py ARG...: python sweep.py ARG..., with $METHODS_FILE's methods.
sweep_py() { python sweep.py ${METHODS_FILE_ARGS[@]+"${METHODS_FILE_ARGS[@]}"} "$@"; }

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

# eps_grid DATASET [WORDS...]: every (seed, method, eps) command of an eps sweep on DATASET, in that loop
# order; WORDS go to `sweep.py grid` (--protocol own: each method with its own protocol's words).
# The flags of each method at each eps (and the dataset's schedule) come from methods.py's table.
eps_grid() {
  local seed method eps key rest grid
  local -A method_flags=()
  grid=$(sweep_py grid --dataset "$1" --methods "$METHODS" --eps "$EPS" "${@:2}") || exit 2
  while read -r method eps rest; do
    method_flags["$method $eps"]=$rest
  done <<< "$grid"
  for seed in $SEEDS; do
    for method in $METHODS; do
      for eps in $EPS; do
        key="$method $eps"
        emit "--dataset=$1 ${method_flags[$key]} --eps=$eps $COMMON --seed=$seed"
      done
    done
  done
}

# emit FLAGS: prints one train.py command line (with $METHODS_FILE first), the extra arguments appended.
emit() {
  local file=""
  [[ -z ${METHODS_FILE:-} ]] || file="$(printf '%q' "${METHODS_FILE_ARGS[0]}") "
  printf 'python train.py %s%s%s\n' "$file" "$*" "$EXTRA_ARGS"
}

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
