#!/usr/bin/env bash
# Every row of a paper table, every seed: one job each, in its own workdir.
#
#   launch/paper_table.sh [--local] [--dry-run] [-- ARGS FOR gdreg.main ...]
#
# Row R with seed K of config C (configs/C.py) runs
#   --config configs/C.py:R --workdir RUNS_DIR/C/R/seedK --config.seed=K ARGS...
# and with MODEL=M (any model; the paper's second table: resnet50, resnet152, densenet121)
#   --config configs/paper.py:M,R --workdir RUNS_DIR/M/R/seedK --config.seed=K ARGS...
# submitted with `sbatch launch/slurm.sbatch` (default), or run one after another on this
# machine with launch/single_node.sh (--local). Rerunning the script resumes unfinished runs
# from their workdirs; finished runs only report their final metrics again.
#
# Options:
#   --local     run sequentially here instead of submitting; stops at the first run that was
#               interrupted (exit 75/130) and reports failed runs at the end (exit 1).
#   --dry-run   print the commands only.
#   Any other argument (and everything after `--`) is passed to every run, e.g.
#   --config.data.name=synthetic.
#
# Knobs (environment variables):
#   CONFIG=resnet18_fb   config file name in configs/ (or a path to a .py file).
#   MODEL=               a model name: the rows of configs/paper.py for it (CONFIG unused).
#   ROWS=paper           paper: the main table (sgd ... practice); fixed: the fixed-dataset
#                        rows of Sec. 4.3; all: both; or a space-separated list of variants.
#   SEEDS="0"            seeds, space-separated (e.g. "0 1 2 3 4"); SEEDS=5 means 0..4.
#   RUNS_DIR=runs        where the workdirs go.
#   SBATCH_ARGS="..."    extra sbatch options, e.g. "--nodes=4 --time=48:00:00 -p gpu".
#   PYTHON=...           interpreter (also passed on to the launch scripts).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # The comment block at the top of this file is its usage.
  sed -n '2,/^[^#]/p' "$0" | sed '/^[^#]/d; /^#SBATCH/d; s/^# \{0,1\}//'
  exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
local_run=0
dry_run=0
extra=()
while (($#)); do
  case "$1" in
    --local) local_run=1 ;;
    --dry-run) dry_run=1 ;;
    --) shift; extra+=("$@"); break ;;
    *) extra+=("$1") ;;
  esac
  shift
done

MODEL="${MODEL:-}"
if [[ -n "$MODEL" ]]; then
  CONFIG=paper
fi
CONFIG="${CONFIG:-resnet18_fb}"
ROWS="${ROWS:-paper}"
SEEDS="${SEEDS:-0}"
RUNS_DIR="${RUNS_DIR:-runs}"
if [[ "$CONFIG" == *.py ]]; then
  config_file="$CONFIG"
else
  config_file="configs/$CONFIG.py"
fi
config_name="${MODEL:-$(basename "$config_file" .py)}"
if [[ ! -f "$config_file" ]]; then
  echo "error: config file $config_file not found (run from the repository root)" >&2
  exit 2
fi

# Row lists from gdreg.program.config, so that this script follows the code.
rows_from_code() {
  local python="${PYTHON:-}"
  if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python; fi
  fi
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -c \
    "import gdreg.program.config as c; print(' '.join($1))"
}
case "$ROWS" in
  paper) rows="$(rows_from_code c.PAPER_ROWS)" ;;
  fixed) rows="$(rows_from_code c.FIXED_DATA_ROWS)" ;;
  all) rows="$(rows_from_code 'c.PAPER_ROWS + c.FIXED_DATA_ROWS')" ;;
  *) rows="$ROWS" ;;
esac
if [[ "$SEEDS" =~ ^[0-9]+$ && "$SEEDS" -gt 1 ]]; then
  SEEDS="$(seq -s ' ' 0 $((SEEDS - 1)))"
fi

failed=()
for row in $rows; do
  for seed in $SEEDS; do
    workdir="$RUNS_DIR/$config_name/$row/seed$seed"
    args=(--config "$config_file:${MODEL:+$MODEL,}$row" --workdir "$workdir" --config.seed="$seed" "${extra[@]}")
    if ((local_run)); then
      cmd=("$repo/launch/single_node.sh" "${args[@]}")
    else
      # shellcheck disable=SC2206  # SBATCH_ARGS is split on purpose
      cmd=(sbatch --job-name="gdreg-$config_name-$row-s$seed" ${SBATCH_ARGS:-}
        "$repo/launch/slurm.sbatch" "${args[@]}")
    fi
    if ((dry_run)); then
      printf '%q ' "${cmd[@]}"
      echo
      continue
    fi
    echo "== $config_name $row seed $seed -> $workdir" >&2
    if ((!local_run)); then
      "${cmd[@]}"
      continue
    fi
    rc=0
    "${cmd[@]}" || rc=$?
    if ((rc == 75 || rc == 130)); then
      echo "== interrupted in $workdir (exit $rc); rerun this script to resume" >&2
      exit "$rc"
    elif ((rc != 0)); then
      echo "== $workdir failed (exit $rc)" >&2
      failed+=("$workdir")
    fi
  done
done
if ((${#failed[@]})); then
  echo "failed runs: ${failed[*]}" >&2
  exit 1
fi
