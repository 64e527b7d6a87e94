#!/usr/bin/env bash
# The GPU figures of docs/performance.md, checked and measured in one command on a GPU node:
#
#   launch/gpu_check.sh 2>&1 | tee gpu_check.txt
#
# Made for a short, offline slot (about 6 minutes on one H200): it installs what the node's
# Python lacks from a local wheel folder, checks that the GPU computes what the CPU computes
# (the penalty against an explicit Hessian, the sharded engine against a per-block loop), then
# times the regularized full-batch step (ResNet-18, width 64, 50,000 synthetic CIFAR-shaped
# images, blocks of 128) and the SGD baseline (batch 128) in bfloat16 and float32, beside the
# reference implementation's own step when PEER is given. It prints one name=value line per
# figure, then the summary table in docs/performance.md's format (python -m gdreg.tools.gpu_check).
#
# Environment:
#   WHEELS=DIR   wheels of what the node lacks, installed with --no-index. Made on a machine
#                with network, for the node's Python (here 3.12) and platform:
#                  pip download -d DIR --only-binary=:all: --python-version 3.12 \
#                    --platform manylinux2014_x86_64 ml-collections tensorboardX tqdm absl-py
#   PEER=DIR     a folder with the team's reference_step.py and the reference's fullbatch/models
#                (copy them into a git-ignored folder of the checkout for an offline node).
#   PYTHON=...   interpreter (default: the checkout's .venv/bin/python if present, else python3).
#   ALLOW_CPU=1  run without a GPU at toy sizes (what the test suite does).
#   BUDGET_SECONDS=0   the loop-shape autotuner's budget over both dtypes; 0 times the GPU's
#                default shape (the tuner's choice on an H200) without a sweep.
# Arguments go to python -m gdreg.tools.gpu_check (--steps, --images).
# Exit status: 0 done; 1 a check failed (the GPU computes something else) or a step failed;
# 2 bad input (no GPU without ALLOW_CPU=1, a PEER folder without reference_step.py).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # The comment block at the top of this file is its usage.
  sed -n '2,/^[^#]/p' "$0" | sed '/^[^#]/d; /^#SBATCH/d; s/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing="$("$PYTHON" - <<'PY'
import importlib.util
wanted = {"ml_collections": "ml-collections", "tensorboardX": "tensorboardX", "tqdm": "tqdm",
          "absl": "absl-py"}
print(" ".join(dist for module, dist in wanted.items() if importlib.util.find_spec(module) is None))
PY
)"
if [[ -n "$missing" ]]; then
  if [[ -z "${WHEELS:-}" ]]; then
    echo "error: this Python lacks $missing; set WHEELS=DIR to a folder of their wheels (see --help)" >&2
    exit 2
  fi
  echo "== installing from $WHEELS: $missing"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" $missing
fi

args=(--budget_seconds="${BUDGET_SECONDS:-0}")
[[ "${ALLOW_CPU:-}" == "1" ]] && args+=(--allow_cpu)
[[ -n "${PEER:-}" ]] && args+=(--peer="$PEER")
exec "$PYTHON" -m gdreg.tools.gpu_check "${args[@]}" "$@"
