#!/usr/bin/env bash
# Fill bench/wheels/ with what bench/gpu_check.sh installs on a GPU machine that has no network:
# TRL and its data stack, pydantic (Tunery's config) and pytest. Run it where PyPI is reachable,
# for the GPU machine's Python (default: this one's), e.g. `bench/gpu_wheels.sh 3.12`.
# Pins are the newest versions that keep the folder under the 64 MiB a device run may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
DEST=bench/wheels
mkdir -p "$DEST"
WHEELS=(
  "trl==1.16.0" "datasets==4.7.0" "pyarrow==21.0.0" "pandas" "python-dateutil" "pytz" "tzdata" "six"
  "dill==0.4.0" "multiprocess==0.70.18" "xxhash" "fsspec==2026.2.0"
  "pydantic" "pydantic-core" "annotated-types" "typing-inspection"
  "pytest" "pluggy" "iniconfig"
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
size=$(du -cm "$DEST"/*.whl | tail -n 1 | cut -f1)
echo "bench/wheels: $(ls "$DEST"/*.whl | wc -l) wheels, ${size} MiB for Python $PYVER"
if [ "$size" -gt 64 ]; then
  echo "error: more than 64 MiB; a device run cannot carry it" >&2
  exit 1
fi
