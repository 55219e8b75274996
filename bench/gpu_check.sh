#!/usr/bin/env bash
# The GPU proof of issue 24 in one run, about 8 minutes on one H100, with no network:
#   1. device, versions and the measured bf16 matmul peak      -> docs/bench/gpu_info.json
#   2. the GPU-relevant tests on CUDA (TUNERY_TEST_DEVICE=cuda)  -> docs/bench/gpu_tests.txt
#   3. Tunery vs transformers.Trainer + peft vs TRL SFTTrainer on the SmolLM2-135M and ~1B Llama
#      shapes (random weights): tokens/s, peak GPU memory, MFU, losses -> docs/bench/gpu_train.{json,md}
# What the machine lacks (TRL and its data stack, pydantic, pytest) is installed from bench/wheels/,
# filled beforehand where PyPI is reachable by bench/gpu_wheels.sh (git-ignored; carry it along).
# Each stage has its own time limit, so one that hangs cannot take the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${GPU_CHECK_OUT:-docs/bench}"
mkdir -p "$OUT"
started=$(date +%s)
stage() { echo; echo "=== $1 ($(($(date +%s) - started)) s elapsed)"; }
status=0

stage "install (no network: bench/wheels/ and this checkout only)"
if compgen -G "bench/wheels/*.whl" >/dev/null; then
  # --no-deps: the folder holds the whole set; pip must not look for anything else.
  $PY -m pip install --quiet --disable-pip-version-check --no-index --no-deps bench/wheels/*.whl \
    || { echo "warning: some wheels did not install"; status=1; }
else
  echo "warning: bench/wheels/ is empty (run bench/gpu_wheels.sh where PyPI is reachable); TRL may be missing"
fi
if ! $PY -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>/dev/null; then
  echo "note: editable install unavailable; using PYTHONPATH=src"
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

stage "device, versions, bf16 matmul peak"
nvidia-smi -L || true
timeout 120 $PY bench/gpu_bench.py info --out "$OUT" || status=1

stage "GPU-relevant tests on CUDA"
TUNERY_TEST_DEVICE=cuda timeout 180 $PY -m pytest -q -p no:cacheprovider \
  tests/test_device.py tests/test_packing.py tests/test_lora_kernel.py 2>&1 | tee "$OUT/gpu_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

stage "training bench: Tunery vs Trainer + peft vs TRL"
left=$((480 - ($(date +%s) - started) - 10))
[ "$left" -lt 120 ] && left=120
timeout "$left" $PY bench/gpu_bench.py bench --out "$OUT" --child-timeout 150 || status=1

stage "done (status $status)"
ls -l "$OUT"/gpu_* 2>/dev/null
exit $status
