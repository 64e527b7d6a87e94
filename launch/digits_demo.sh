#!/usr/bin/env bash
# The CPU-sized real-data demonstration: SGD against full batch on scikit-learn's 8x8 digits.
#
#   launch/digits_demo.sh [OUT_DIR] [FLAG...]
#
# Trains configs/digits.py's four variants (sgd, fb, fb_clip, fb_clip_reg) one after the
# other into OUT_DIR/<variant> (default: runs/digits), then writes OUT_DIR/report.md and
# OUT_DIR/curves.png with `python -m gdreg.tools.report`. FLAGs go to every `python -m gdreg.main`
# call, e.g. --config.seed=1. A finished variant is not trained again (its workdir resumes
# from the final checkpoint); delete OUT_DIR to start over. PYTHON picks the interpreter
# (default: the checkout's .venv/bin/python if there is one, else python).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # The comment block at the top of this file is its usage.
  sed -n '2,/^[^#]/p' "$0" | sed '/^[^#]/d; /^#SBATCH/d; s/^# \{0,1\}//'
  exit 0
fi

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
OUT=runs/digits
if [[ $# -gt 0 && "$1" != -* ]]; then  # an OUT_DIR; arguments starting with - are FLAGs
  OUT=$1
  shift
fi

VARIANTS=(sgd fb fb_clip fb_clip_reg)
began=$SECONDS
for variant in "${VARIANTS[@]}"; do
  start=$SECONDS
  echo "== $variant -> $OUT/$variant"
  "$PYTHON" -m gdreg.main --config "configs/digits.py:$variant" --workdir "$OUT/$variant" "$@"
  echo "== $variant: $((SECONDS - start)) s"
done
"$PYTHON" -m gdreg.tools.report "${VARIANTS[@]/#/$OUT/}" --out "$OUT"
echo "== all four variants and the report: $((SECONDS - began)) s"
