#!/usr/bin/env bash
# Every GPU check of the project, in stages that each fit a 10-minute device call.
#
#   bench/gpu_suite.sh tests        # pytest -m cuda (junit XML + log)
#   bench/gpu_suite.sh kernels      # bench/bench_kernels.py (pytest-benchmark JSON)
#   bench/gpu_suite.sh heal         # bench_heal.py: DeiT-B (gpu + pinned stores), DeiT3-H
#   bench/gpu_suite.sh cnn          # bench_heal.py: MobileNetV1 (random weights, 224x224)
#   bench/gpu_suite.sh sparse24     # bench_sparse24.py --quick (2:4 linears, healing step, export)
#   bench/gpu_suite.sh compaction   # bench_compaction.py on DeiT-B (MLP and QK+MLP, 0.5 and 0.75)
#   bench/gpu_suite.sh all          # all six in order (over 30 minutes: more than one device call)
#
# Results go to $OUT/bench/results when OUT is set (the device tool copies $OUT back), else to
# bench/results. Each stage runs under `timeout`; the benchmarks save their JSON after every
# measured case, so a stage cut short still returns what it measured.
# On the lent machines (torch 2.11, triton 3.6, no registry) the package runs from the tree:
# PYTHONPATH is set below, nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="${OUT:+$OUT/bench/results}"
RESULTS="${RESULTS:-bench/results}"
mkdir -p "$RESULTS"
STAGE_SECONDS="${STAGE_SECONDS:-570}"
TAG="$(python -c 'import sys; sys.path.insert(0, "bench"); from devices import device_tag; print(device_tag())')"

stage_tests() {
    timeout "$STAGE_SECONDS" python -m pytest -m cuda -q -p no:cacheprovider \
        --junitxml="$RESULTS/cuda_tests_$TAG.xml" 2>&1 | tee "$RESULTS/cuda_tests_$TAG.log" | tail -40
}

stage_kernels() {
    timeout "$STAGE_SECONDS" python -m pytest bench/bench_kernels.py -q -p no:cacheprovider \
        --benchmark-json="$RESULTS/kernels_$TAG.json" 2>&1 | tail -60
}

stage_heal() {
    local half=$((STAGE_SECONDS / 2))
    timeout "$half" python bench/bench_heal.py --model deit_base_patch16_224 --batch-size 128 --steps 40 --warmup 5 \
        --stores gpu pinned --output "$RESULTS/heal_deit_base_patch16_224_$TAG.json"
    timeout "$half" python bench/bench_heal.py --model deit3_huge_patch14_224 --batch-size 32 --steps 20 --warmup 5 \
        --stores auto --output "$RESULTS/heal_deit3_huge_patch14_224_$TAG.json"
}

stage_cnn() {
    timeout "$STAGE_SECONDS" python bench/bench_heal.py --model mobilenetv1_100 --batch-size 128 --steps 40 \
        --warmup 5 --stores auto --output "$RESULTS/heal_mobilenetv1_100_$TAG.json"
}

stage_sparse24() {
    timeout "$STAGE_SECONDS" python bench/bench_sparse24.py --quick --output "$RESULTS/sparse24_$TAG.json"
}

stage_compaction() {
    timeout "$STAGE_SECONDS" python bench/bench_compaction.py --model deit_base_patch16_224 --batch-size 128 \
        --steps 24 --warmup 4 --kinds mlp qk_mlp --output "$RESULTS/compaction_deit_base_patch16_224_$TAG.json"
}

case "${1:-}" in
    tests | kernels | heal | cnn | sparse24 | compaction) "stage_$1" ;;
    all) for stage in tests kernels heal cnn sparse24 compaction; do echo "== $stage"; "stage_$stage"; done ;;
    *) echo "usage: $0 tests|kernels|heal|cnn|sparse24|compaction|all" >&2; exit 2 ;;
esac
