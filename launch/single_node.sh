#!/usr/bin/env bash
# One training run on one machine, using all of its GPUs from a single process.
#
#   launch/single_node.sh --config configs/resnet18_fb.py:regularized --workdir runs/reg [--config.X=Y ...]
#
# Every argument is passed to `python -m gdreg.main` unchanged. JAX runs data parallel over
# all local devices of one process (gdreg.engine.fullbatch shards the blocks over a device mesh), so
# no extra processes are started; for several machines use launch/slurm.sbatch. Run it from
# the repository root (relative --config and --workdir paths are taken from the current
# directory). Rerunning with the same --workdir resumes from its last checkpoint.
#
# Knobs (environment variables):
#   GPUS=0,1      GPUs to use, exported as CUDA_VISIBLE_DEVICES (default: all visible GPUs;
#                 an already set CUDA_VISIBLE_DEVICES is kept when GPUS is unset).
#   PYTHON=...    interpreter (default: .venv/bin/python of the repository if it exists,
#                 otherwise `python` on PATH).
#   XLA_PYTHON_CLIENT_MEM_FRACTION, XLA_FLAGS, ...  passed through to JAX as usual.
#
# Exit status is gdreg.main's: 0 done, 2 config/dataset error or a run directory that cannot
# be written (a full disk: free space and rerun to resume), 3 diverged, 75 stopped by
# SIGTERM/SIGINT/SIGHUP after saving a checkpoint (rerun to resume).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  # The comment block at the top of this file is its usage.
  sed -n '2,/^[^#]/p' "$0" | sed '/^[^#]/d; /^#SBATCH/d; s/^# \{0,1\}//'
  exit 0
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then
    PYTHON="$repo/.venv/bin/python"
  else
    PYTHON=python
  fi
fi
if [[ -n "${GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
# Import gdreg from this checkout even when it is not installed.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# exec: SIGTERM/SIGINT reach the trainer directly and its exit status is ours.
exec "$PYTHON" -m gdreg.main "$@"
