#!/usr/bin/env bash
# The GPU figures owed in README "Performance", in one command on a GPU node:
#
#   launch/gpu_bench.sh [FLAG...] 2>&1 | tee gpu_bench.txt
#
# ResNet-18 at full width (64) on IMAGES synthetic CIFAR-shaped images (32x32x3, 10 classes):
#   1. the regularized full-batch step of the paper (penalty strength 0.5 with forward
#      differences, clipping, Nesterov momentum; configs/resnet18_fb.py:regularized) with blocks
#      of 128 and of 32, in float32 and in bfloat16 (model.dtype). For each: the autotuner's
#      table of loop shapes (`sweep` lines: seconds per step of every candidate, or why it was
#      skipped) and the `chosen` shape, then, from a fresh process, one line for that shape
#      with seconds per step, images per second, peak device memory and the fraction of the
#      device's peak FLOP rate;
#   2. SGD (the paper's baseline, batch 128; configs/resnet18_fb.py:sgd) in float32 and
#      bfloat16: images per second over one epoch of minibatch steps.
# FLAGs go to every `python -m gdreg.tools.bench` call (e.g. --config.penalty.method=jvp).
#
# Knobs (environment variables):
#   GPUS=0          GPUs to use, exported as CUDA_VISIBLE_DEVICES (default: all visible).
#   IMAGES=50000    training images (default: CIFAR-10's 50,000).
#   AUTOTUNE_SECONDS=900  the sweep's budget per configuration (default 900, enough for every
#                   candidate; training's default, train.autotune_seconds, is 30).
#   STEPS=3         timed steps (epochs for SGD) after the compiling one.
#   PYTHON=...      interpreter (default: the checkout's .venv/bin/python if it exists, else
#                   python).
#   ALLOW_CPU=1     run even where JAX sees no GPU (to try the script on a laptop with
#                   IMAGES=512 --config.model.width=8).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [[ -n "${GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
IMAGES=${IMAGES:-50000}
AUTOTUNE_SECONDS=${AUTOTUNE_SECONDS:-900}
STEPS=${STEPS:-3}

"$PYTHON" -c "
import sys, jax
print('== jax', jax.__version__, 'on', jax.device_count(), 'x', jax.devices()[0].device_kind)
if jax.default_backend() == 'cpu' and '${ALLOW_CPU:-}' != '1':
    sys.exit('error: JAX sees no GPU here; run this on a GPU node (or set ALLOW_CPU=1)')
"

sweep_output="$(mktemp)"
trap 'rm -f "$sweep_output"' EXIT
for dtype in float32 bfloat16; do
  for block in 128 32; do
    full_batch=(--config configs/resnet18_fb.py:regularized --config.train.block_size="$block"
      --config.model.dtype="$dtype" --images "$IMAGES")
    echo "== full batch, blocks of $block, $dtype: the autotuner's table"
    "$PYTHON" -m gdreg.tools.bench "${full_batch[@]}" --sweep \
      --config.train.autotune_seconds="$AUTOTUNE_SECONDS" "$@" | tee "$sweep_output"
    # The chosen shape, timed alone in a fresh process (its peak memory is its own).
    chosen=()
    for field in blocks_per_microbatch microbatch_loop block_loop; do
      value="$(sed -n "s/^chosen .* $field=\([^ ]*\).*/\1/p" "$sweep_output")"
      chosen+=(--config.train."$field"="$value")
    done
    echo "== full batch, blocks of $block, $dtype: the chosen shape"
    "$PYTHON" -m gdreg.tools.bench "${full_batch[@]}" "${chosen[@]}" --steps "$STEPS" "$@"
  done
done
for dtype in float32 bfloat16; do
  echo "== SGD, batch 128, $dtype"
  "$PYTHON" -m gdreg.tools.bench --config configs/resnet18_fb.py:sgd --config.model.dtype="$dtype" \
    --images "$IMAGES" --steps "$STEPS" "$@"
done
