#!/usr/bin/env bash
# The GPU check: one command, on one CUDA GPU, in under 8 minutes.
#
#   bash recipes/bench/gpu_check.sh            # writes runs/gpu_check/{tests,layers,step}.log and table.md
#
# 1. the CUDA-only tests (tests/test_cuda.py and the CUDA cases of tests/test_sparse.py: bf16 layers of
#    every method against float64 math, csr / cuSPARSE, 2:4 semi-structured, the ledger against the CUDA
#    allocator, the recipe in bf16 with 8-bit states and with FSDP2 over NCCL on one rank);
# 2. the layer benchmark in bf16 (dense, low-rank, SLTrain per backend, LOST, LOST-SiLU, CoLA);
# 3. a LLaMA-60M training step in bf16: tokens/s and max_memory_allocated per method, AdamW and 8-bit
#    states with per-layer updates;
# and collects the three into one markdown table (runs/gpu_check/table.md) for docs/benchmarks.md.
# Without a CUDA device it says so and exits with status 0, having run nothing.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-runs/gpu_check}
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch; nothing was run (this check needs one GPU)"
    exit 0
fi
mkdir -p "$OUT"
"$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")' | tee "$OUT/device.txt"
status=0

echo "== 1/3 CUDA tests"
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py tests/test_sparse.py -rs 2>&1 | tee "$OUT/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2/3 layer benchmark (bf16)"
timeout 120 "$PYTHON" -m recipes.bench.layers --shapes 1024x1024 1024x2736 2048x2048 2048x5461 4096x4096 --tokens 8192 --repeats 9 --no-write 2>&1 | tee "$OUT/layers.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 3/3 LLaMA-60M step (bf16)"
timeout 150 "$PYTHON" -m recipes.bench.step --sizes llama_60m --batch-size 16 --repeats 7 --no-write 2>&1 | tee "$OUT/step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

{
    echo "GPU check on $(cat "$OUT/device.txt" | sed 's/^gpu_check: //') (\`bash recipes/bench/gpu_check.sh\`)."
    echo
    echo "Tests: $(tail -n 1 "$OUT/tests.log")"
    echo
    sed -n '/^| shape/,/^$/p' "$OUT/layers.log"
    echo
    sed -n '/^| size/,/^$/p' "$OUT/step.log"
} > "$OUT/table.md"
echo "== wrote $OUT/table.md (status $status)"
exit $status
