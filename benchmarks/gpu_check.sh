#!/usr/bin/env bash
# The GPU check in one call (under 10 minutes on one H100/H200): the attention and model-parity tests on the GPU,
# then `glmv bench --backend gpu` (ours vs transformers on CUDA, bf16, benchmarks/gpu_1b.yaml, 4096-token rows
# with an image, MFU by MaxText's FLOP convention). Everything lands under $OUT (default runs/gpu_check):
# env.txt, tests.log, bench.log, bench.json.
#   bash benchmarks/gpu_check.sh             on the GPU machine (the device tool: run it from the repo root)
#   bash benchmarks/gpu_check.sh --dry-run   anywhere: the bench's code on the tiny config, no tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in the bench's process: no preallocation of 75% of its memory by JAX
export XLA_PYTHON_CLIENT_PREALLOCATE=false
if [[ "${1:-}" == "--dry-run" ]]; then
  JAX_PLATFORMS=cpu timeout 900 "$PYTHON" -m benchmarks.bench --backend gpu --dry-run --json "$OUT/bench.json" \
    2>&1 | tee "$OUT/bench.log"
  exit "${PIPESTATUS[0]}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PYTHON" -c \
  "import jax, torch, transformers; print(jax.__version__, jax.devices(), torch.__version__, transformers.__version__)"
} > "$OUT/env.txt" 2>&1
# attention impls against the reference (cudnn in bf16, xla/cpu in f32) and the whole model against transformers
# (f32: "cudnn" falls back to "xla"; the bf16 yardstick runs cuDNN); the 8-device CP tests need CPU devices: CI runs them
timeout 200 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_attention.py -k "not splash" \
  tests/test_model_parity.py::test_logits_equal_reference \
  tests/test_model_parity.py::test_logits_equal_reference_with_each_attention_impl \
  tests/test_model_parity.py::test_bfloat16_deviation_within_reference_yardstick \
  2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
timeout 330 "$PYTHON" -m benchmarks.bench --backend gpu --repeats 5 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests rc=$tests bench rc=$bench"
exit $(( tests || bench ))
