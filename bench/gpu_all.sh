#!/usr/bin/env bash
# Everything to measure on one GPU in one go (no network needed):
#   1. bench/gpu_smoke.py   correctness: bf16 and fp16 steps (a NaN step skipped by the fp16 loss scaler), a bf16
#                           run from the cache against the same run without it, train.compile on and off,
#                           TensorBoard events (real-size amused-256, random weights)
#   2. bench/train.py       peak memory and s/step of a representative subset of the recipes, the kit's
#                           train.compile lever on the bs 1 LoRA recipe, the reference trainer's H100 figures beside
#   3. bench/sample.py      the sampler against diffusers' pipeline, briefly
#   4. bench/gpu_side_by_side.py, once per row (nouns_256_lora_bs1x16, minecraft_512_lora_bs1x8,
#                           nouns_256_full8bit_bs1x16): diffusers' train_amused.py and the kit's defaults on this
#                           card, interleaved, median s/step and peak memory against the kit's prediction; then the
#                           recipes' `# measured:` headers and the README's recipes table are written from them.
#                           Needs the reference script at $REFERENCE (default reference/train_amused.py, an ignored
#                           folder: copy diffusers' examples/amused/train_amused.py there); skipped without it.
# Parts 1-3 take about 7 minutes on an H100/H200; part 4 several minutes per row (the kit compiles once per
# process): PARTS="side" runs part 4 only, ROWS and ROUNDS / TIMED / CONFIGS size it.
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
PARTS="${PARTS:-smoke train sample side}"
REFERENCE="${REFERENCE:-reference/train_amused.py}"
ROWS="${ROWS:-nouns_256_lora_bs1x16 minecraft_512_lora_bs1x8 nouns_256_full8bit_bs1x16}"

RECIPES='^(nouns_256_lora_bs1x16|nouns_256_lora_bs1x16\+compile|styledrop_256|nouns_256_full8bit_bs1x16|minecraft_512_lora_bs1x8)$'
if [ "$CPU" = 1 ]; then
  SMOKE=(bench/gpu_smoke.py --out "$OUT" --cpu-smoke)
  TRAIN=(bench/train.py --tiny --steps 1 --warmup 1 --images 4 --only '^styledrop_256$'
         --out "$OUT")
  SAMPLE=(bench/sample.py --tiny --batch-sizes 1 --warmup 1 --repeats 1 --steps 4)
  SIDE=(bench/gpu_side_by_side.py --tiny --rounds "${ROUNDS:-1}" --timed "${TIMED:-1}" --configs ${CONFIGS:-reference kit})
  ROWS="${ROWS_SMOKE:-nouns_256_full8bit_bs1x16}"
  LIMITS=(90 90 60 400)
else
  SMOKE=(bench/gpu_smoke.py --out "$OUT")
  TRAIN=(bench/train.py --steps 3 --warmup 1 --images 16 --budget-s 150 --only "$RECIPES" --out "$OUT")
  SAMPLE=(bench/sample.py --batch-sizes 1 8 --warmup 2 --repeats 3)
  SIDE=(bench/gpu_side_by_side.py --rounds "${ROUNDS:-2}" --timed "${TIMED:-4}" --configs ${CONFIGS:-reference kit kit-eager})
  LIMITS=(190 180 60 900)
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

want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
want smoke && part smoke "${LIMITS[0]}" "$PY" "${SMOKE[@]}"
want train && part train "${LIMITS[1]}" "$PY" "${TRAIN[@]}"
want sample && part sample "${LIMITS[2]}" "$PY" "${SAMPLE[@]}"
if want side && [ ! -f "$REFERENCE" ]; then
  echo "side: skipped: no reference trainer at $REFERENCE (set REFERENCE=path/to/train_amused.py)" | tee -a "$SUMMARY"
elif want side; then
  for row in $ROWS; do
    part "side-$row" "${LIMITS[3]}" "$PY" "${SIDE[@]}" --reference "$REFERENCE" --rows "$row" \
      --out "$OUT" --name "gpu_side_by_side-$row"
  done
  if [ "$CPU" = 0 ] && ls "$OUT"/gpu_side_by_side-*.json > /dev/null 2>&1; then  # the measured column, README table
    part measured 120 "$PY" bench/gpu_side_by_side.py --write-from "$OUT"/gpu_side_by_side-*.json --out "$OUT"
  fi
fi
echo "wrote $SUMMARY"
cat "$SUMMARY"
