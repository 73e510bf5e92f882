#!/usr/bin/env bash
# The GPU throughput grid of `python -m me5.app.bench` in one command (about 5-8 minutes on one H200/H100):
# models small/base/large (random init, real shapes) x global batch 1k/4k/32k x fixed/variable lengths,
# methods: ours (GradCache, token-budget chunks sorted by length), naive (no caching; OOM is a row) and
# sentence-transformers' CachedMultipleNegativesRankingLoss; bf16 autocast; then a torch.profiler table.
#
#   OUT=/some/dir experiments/bench_gpu.sh            # writes $OUT/bench.md, bench.jsonl, meta.json, bench.log
#   BENCH_ARGS="--models large --batches 32768" experiments/bench_gpu.sh   # a subset (extra args are appended)
#
# Needs: a CUDA build of torch, transformers, sentence-transformers and lightning importable by $PY (the repo's
# src/ is put on PYTHONPATH); no network (models are built from config). Rows are written as they finish, so a
# run cut short by TIMEOUT_S still leaves its table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-experiments/bench-gpu-$(date +%Y%m%d-%H%M%S)}"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
TIMEOUT_S="${TIMEOUT_S:-570}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, transformers, sentence_transformers, lightning
assert torch.cuda.is_available(), "no CUDA device: run `python -m me5.app.bench` (CPU grid) instead"
print("gpu", torch.cuda.get_device_name(0), "x", torch.cuda.device_count())
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "sentence-transformers", sentence_transformers.__version__, "lightning", lightning.__version__)
PY
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# shellcheck disable=SC2086
timeout "$TIMEOUT_S" "$PY" -m me5.app.bench --device cuda --out "$OUT" --profile ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "table: $OUT/bench.md"
