#!/usr/bin/env bash
# One prepared GPU check for a borrowed H100/H200 (< 8 minutes). Run from the repo root:
#   bash profiling/gpu_check.sh            # results under $OUT (or /tmp/nurserve_gpu_out)
# Steps: environment, pytest of tests/test_graph_runner.py (its CUDA parts included), the GPU
# checks (profiling/gpu_tests.py), the reward-head kernel check (profiling/gpu_reward_check.py),
# the benchmarks (profiling/gpu_bench.py), then a merged report:
#   $OUT/gpu_results.json, $OUT/gpu_results.md, and one log per step.
# A failed or timed-out step is recorded and the next one still runs.
set -o pipefail
export PYTHONPATH=.
export PYTHONUNBUFFERED=1
unset NUMBA_ENABLE_CUDASIM TRITON_INTERPRET  # real numba-cuda and compiled Triton here
OUT=${OUT:-/tmp/nurserve_gpu_out}
WORK=${WORK:-/tmp/nurserve_gpu_work}  # intermediate JSONs (OUT returns at most 8 files)
PY=${PY:-python3}
BUDGET=${BUDGET:-465}  # seconds for the whole script
mkdir -p "$OUT" "$WORK"
rm -f "$WORK"/*.json "$WORK/steps.tsv"
START=$SECONDS

# run_step NAME MAX_SECONDS LOG CMD...: timeout = min(MAX_SECONDS, what is left minus a reserve)
run_step() {
    local name=$1 max=$2 log=$3
    shift 3
    local left=$((BUDGET - (SECONDS - START) - 15))
    local limit=$((max < left ? max : left))
    if ((limit < 10)); then
        printf '%s\tskipped\t0\n' "$name" >>"$WORK/steps.tsv"
        echo "== $name: skipped, budget spent" | tee -a "$OUT/$log"
        return
    fi
    echo "== $name (timeout ${limit}s)" | tee -a "$OUT/$log"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$WORK/steps.tsv"
    echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/$log"
}

env_info() {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: ${NURSERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sms", p.multi_processor_count, "mem_gib", round(p.total_memory / 2**30, 1))
for name in ("triton", "numba", "numba_cuda", "numpy", "tqdm", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__)
EOF
}

export -f env_info
export PY
run_step env 30 env.log bash -c env_info
run_step pytest 90 pytest.log "$PY" -m pytest -c /dev/null --rootdir . -q -rs -p no:cacheprovider \
    tests/test_graph_runner.py
run_step gpu_tests 170 tests.log "$PY" profiling/gpu_tests.py --out "$WORK/gpu_tests.json"
run_step reward 45 reward.log "$PY" profiling/gpu_reward_check.py "$OUT/reward.json"
run_step gpu_bench 200 bench.log "$PY" profiling/gpu_bench.py bench --out "$WORK/gpu_bench.json"
timeout 30 "$PY" profiling/gpu_bench.py report --tests "$WORK/gpu_tests.json" \
    --bench "$WORK/gpu_bench.json" --steps "$WORK/steps.tsv" --out "$OUT/gpu_results" \
    2>&1 | tee -a "$OUT/bench.log"
echo "total $((SECONDS - START))s; steps:"
cat "$WORK/steps.tsv"
ls -la "$OUT"
