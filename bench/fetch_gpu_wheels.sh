#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the wheels the GPU machine needs for the cached-plan 2:4 path:
# CPython 3.12, manylinux x86-64 (that machine's Python; it reaches no package registry). Carry .whl in the
# device call; bench/gpu_check_sparse24.py installs them into /tmp/site before its checks.
#
#   bench/fetch_gpu_wheels.sh        # nvmath-python and what it imports, about 19.6 MiB
#
# Not fetched: nvidia-cusparselt-cu13 (0.10.0 is a 162 MiB wheel, over the 64 MiB a device call carries). The
# GPU machine's torch 2.11 brought its pinned 0.8.0, which torch loads at import and the binding then finds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(nvmath-python==1.0.1 cuda-bindings==13.5.0 cuda-core==1.2.2 cuda-pathfinder==1.9.1)
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
for wheel in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$staging" "$wheel"
done
mkdir -p .whl
for file in "$staging"/*.whl; do
    name="$(basename "$file")"
    rm -f .whl/"${name%%-*}"-*.whl            # one version of each: two stop the whole install
    mv "$file" .whl/
done
ls -l .whl/*.whl
du -ch .whl/*.whl | tail -n 1
