#!/usr/bin/env bash
# Everything to measure on one GPU in one go (about 7 minutes on an H100/H200; no network needed):
#   1. bench/gpu_smoke.py   correctness: bf16 and fp16 steps (a NaN step skipped by the fp16 loss scaler), a bf16
#                           run from the cache against the same run without it, train.compile on and off,
#                           TensorBoard events (real-size amused-256, random weights)
#   2. bench/train.py       peak memory and s/step of a representative subset of the recipes, the kit's
#                           train.compile lever on the bs 1 LoRA recipe, the reference trainer's H100 figures beside
#   3. bench/sample.py      the sampler against diffusers' pipeline, briefly
# Each part has its own time limit, so one failing or hanging part does not lose the others. Everything goes under
# $OUT (default bench/results): one log per part and summary.txt.
#
#   bash bench/gpu_all.sh                 # on the GPU machine
#   OUT=/tmp/gpu bash bench/gpu_all.sh    # elsewhere
#   bash bench/gpu_all.sh --cpu-smoke     # the same parts on the CPU with the tiny model (checks the script, < 2 min)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
SUMMARY="$OUT/summary.txt"
CPU=0
[ "${1:-}" = "--cpu-smoke" ] && CPU=1

RECIPES='^(nouns_256_lora_bs1x16|nouns_256_lora_bs1x16\+compile|styledrop_256|nouns_256_full8bit_bs1x16|minecraft_512_lora_bs1x8)$'
if [ "$CPU" = 1 ]; then
  SMOKE=(bench/gpu_smoke.py --out "$OUT" --cpu-smoke)
  TRAIN=(bench/train.py --tiny --steps 1 --warmup 1 --images 4 --only '^styledrop_256$'
         --out "$OUT")
  SAMPLE=(bench/sample.py --tiny --batch-sizes 1 --warmup 1 --repeats 1 --steps 4)
  LIMITS=(90 90 60)
else
  SMOKE=(bench/gpu_smoke.py --out "$OUT")
  TRAIN=(bench/train.py --steps 3 --warmup 1 --images 16 --budget-s 150 --only "$RECIPES" --out "$OUT")
  SAMPLE=(bench/sample.py --batch-sizes 1 8 --warmup 2 --repeats 3)
  LIMITS=(190 180 60)
fi

{
  echo "amused-tune GPU bench, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} > "$SUMMARY"

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log, one line in the summary
  local name="$1" limit="$2"; shift 2
  local started=$SECONDS
  echo "== $name (limit ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local what="ok"
  [ $rc -ne 0 ] && what="FAILED (exit $rc)"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && what="TIMED OUT after ${limit} s"
  echo "$name: $what in $((SECONDS - started)) s (log: $OUT/$name.log)" | tee -a "$SUMMARY"
  tail -n "${TAIL:-25}" "$OUT/$name.log" | sed 's/^/    /' >> "$SUMMARY"
}

part smoke "${LIMITS[0]}" "$PY" "${SMOKE[@]}"
part train "${LIMITS[1]}" "$PY" "${TRAIN[@]}"
part sample "${LIMITS[2]}" "$PY" "${SAMPLE[@]}"
echo "wrote $SUMMARY"
cat "$SUMMARY"
