#!/usr/bin/env bash
# One device call that proves or disproves the fast path (the device tool: run it with timeout_s 540).
#
#   bench/gpu_check.sh              # on a GPU: about 8 minutes; results in $OUT
#                                   #   (default bench/results/gpu_check_<device>, to commit)
#   bench/gpu_check.sh --rehearse   # the same parts on a CPU with tiny shapes, under 7 minutes (CI runs it;
#                                   #   default $OUT: a temporary folder)
#
# Parts, in order of value, each a separate process under its own cap (timeout -k), so a crash, an
# illegal memory access or a hang in one cannot take the others down:
#   A env        versions, device, measured copy bandwidth and bf16 matmul rate, every Triton kernel
#                against its reference on poisoned outputs (bf16, fp16 with a scaled loss, fp32; one config)
#   B e2e        tiny-ViT heals (exact, fast torch/Triton, device/pinned store, fp16); the paper's jobs
#                scaled (whole call: reference loop, fast, eager, compiled); DeiT-B batch-128 steady state
#   C compile    two processes, empty inductor caches, one shared starfish_fast compile cache: cold, warm
#   D profile    torch.profiler over fast DeiT-B steps: top kernels and their share
#   E kernels    fused loss, masked Adam, masked linear against the torch paths they replace
#   F sparse24   2:4 backends with the carried wheels (.whl, bench/fetch_gpu_wheels.sh): correct, timed
#   G tests      pytest -m cuda (one autotune config), most valuable files first, with the time left
# Files in $OUT (no subfolders, at most 8): gpu_check.jsonl (one JSON object per measurement, written
# as it happens), gpu_check.log (every part's output), pytest.log, pytest.xml, stacks.txt (Python stacks
# of a part killed or near its cap), summary.md (every check, the targets, the recommended auto table).
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=""
[ "${1:-}" = "--rehearse" ] && REHEARSE="--rehearse"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# a compile cache of this run only: the compile part starts cold on purpose
export XDG_CACHE_HOME="${XDG_CACHE_HOME_GPU_CHECK:-$(mktemp -d)}"
if [ -z "${OUT:-}" ]; then
    if [ -n "$REHEARSE" ]; then OUT="$(mktemp -d)"; else
        OUT="bench/results/gpu_check_$("$PY" -c 'import sys; sys.path.insert(0, "bench"); import devices; print(devices.device_tag())')"
    fi
fi
mkdir -p "$OUT"
if [ -n "$REHEARSE" ]; then BUDGET="${GPU_CHECK_SECONDS:-400}"; else BUDGET="${GPU_CHECK_SECONDS:-480}"; fi
START=$SECONDS
CHECK=(bench/gpu_check.py)

part() {  # part NAME SHARE_PERCENT: one process, capped at its share of the budget and the time left
    local name=$1 cap=$(( BUDGET * $2 / 100 )) left=$(( BUDGET - (SECONDS - START) - 15 ))
    (( cap > left )) && cap=$left
    if (( cap < 10 )); then
        "$PY" "${CHECK[@]}" note --out "$OUT" --part "$name" --error "not run: no time left"
        return
    fi
    echo "== part $name, cap ${cap}s, $(date +%T)" >> "$OUT/gpu_check.log"
    timeout -k 10 "$cap" "$PY" "${CHECK[@]}" "$name" --out "$OUT" --cap "$cap" $REHEARSE >> "$OUT/gpu_check.log" 2>&1
    "$PY" "${CHECK[@]}" note --out "$OUT" --part "$name" --rc $? --cap "$cap"
}

part env 8
part e2e 34
part compile 12
part profile 6
part kernels 8
part sparse24 12
# G: the CUDA tests, most valuable first, with whatever time is left (a hang is dumped by faulthandler);
# one autotune config per kernel (a correctness run), the 2:4 part's wheels importable
LEFT=$(( BUDGET - (SECONDS - START) - 10 ))
if (( LEFT >= 20 )); then
    echo "== part tests, cap ${LEFT}s, $(date +%T)" >> "$OUT/gpu_check.log"
    STARFISH_TRITON_ONE_CONFIG=1 PYTHONPATH="/tmp/site:$PYTHONPATH" timeout -k 10 "$LEFT" "$PY" -m pytest -m cuda -v \
        -rA -p no:cacheprovider -o faulthandler_timeout=$(( LEFT - 5 )) --junitxml="$OUT/pytest.xml" \
        tests/test_heal.py tests/test_kernel_cosine_loss.py tests/test_kernel_masked_adam.py tests/test_kernel_ops.py \
        tests/test_sparse24.py tests/test_cusparselt.py tests/test_compaction.py tests/test_export.py \
        tests/test_lm_heal.py tests/test_kernel_masked_linear.py > "$OUT/pytest.log" 2>&1
    "$PY" "${CHECK[@]}" note --out "$OUT" --part tests --rc $? --cap "$LEFT"
else
    "$PY" "${CHECK[@]}" note --out "$OUT" --part tests --error "not run: no time left"
fi
"$PY" "${CHECK[@]}" summary --out "$OUT"
echo "gpu_check: $(( SECONDS - START ))s; $(grep -c '"ok": false' "$OUT/gpu_check.jsonl") failed checks; $OUT/summary.md"
