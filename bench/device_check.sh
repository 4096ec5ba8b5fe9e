#!/usr/bin/env bash
# One GPU check of rimlab, under 8 minutes on one H100/H200, writing one JSON:
#   1. the tests marked `gpu` (bf16 + channels_last training of PSPNet-R50 and RIM stage 2,
#      module.compile=true, predict and ONNX on CUDA, metrics equal to the CPU's);
#   2. bench/train_step.py, stage 1 and stage 2 (ARBS + ILM): PSPNet-R50, 400x400, batch 16, bf16,
#      channels_last, rimlab as run.py builds it vs a hand loop, interleaved rounds;
#   3. bench/data_pipeline.py with 14 loader workers (when the file exists).
#
#   bash bench/device_check.sh [OUT_DIR]          # default OUT_DIR: bench/results/device_check
#   RIMLAB_DEVICE_CHECK_CPU=1 bash bench/device_check.sh /tmp/x   # CPU smoke test, tiny settings
#
# OUT_DIR/device_check.json holds every part's exit status, seconds and JSON result; the logs lie
# beside it. A failing part does not stop the others; the script exits non-zero if one failed.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-bench/results/device_check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python}

if [ "${RIMLAB_DEVICE_CHECK_CPU:-0}" = 1 ]; then
  TESTS=(tests/test_gpu.py -q -m "not gpu")
  STEP=(--device cpu --size 32 --batch 2 --steps 2 --warmup 1 --repeats 1 --precision 32
        --override model=pspnet_lite --data-batches 0)
  DATA=(--size 96x64 --images 4 --batch 2 --batches 1 --repeats 1 --workers 0)
  SLOW=4  # a shared 2-core machine: wider time limits
else
  SLOW=1
  TESTS=(tests/test_gpu.py -q -m gpu)
  STEP=(--size 400 --batch 16 --steps 30 --warmup 10 --repeats 3 --data-batches 0
        --no-same-maths)  # the caps below were sized for two variants
  # 448 images: 2 batches of 16 per worker and epoch (the workers persist across the rounds)
  DATA=(--workers 14 --repeats 2 --images 448 --batches 40)
fi

part() {  # part NAME SECONDS_LIMIT COMMAND...: runs it, records status and time
  local name=$1 limit=$(($2 * SLOW))
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s"
  printf '%s %s %s\n' "$name" "$rc" "$((SECONDS - start))" >>"$OUT/parts.txt"
}

rm -f "$OUT/parts.txt"
part gpu_tests 240 "$PY" -m pytest "${TESTS[@]}" -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"
part train_step_stage1 75 "$PY" bench/train_step.py "${STEP[@]}" --stage 1 \
  --data-dir "$OUT/data" --json "$OUT/train_step_stage1.json"
part train_step_stage2 75 "$PY" bench/train_step.py "${STEP[@]}" --stage 2 \
  --data-dir "$OUT/data" --json "$OUT/train_step_stage2.json"
if [ -f bench/data_pipeline.py ]; then
  part data_pipeline 75 "$PY" bench/data_pipeline.py "${DATA[@]}" --json "$OUT/data_pipeline.json"
fi

"$PY" - "$OUT" <<'EOF'
import json, platform, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
report = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "torch": torch.__version__,
    "host": platform.node(),
    "parts": {},
}
failed = False
for line in (out / "parts.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    entry = {"rc": int(rc), "seconds": int(seconds)}
    result = out / f"{name}.json"
    if result.is_file():
        entry["result"] = json.loads(result.read_text())
    log = (out / f"{name}.log").read_text(errors="replace").splitlines()
    entry["log_tail"] = log[-15:]
    report["parts"][name] = entry
    failed |= int(rc) != 0
(out / "device_check.json").write_text(json.dumps(report, indent=2))
print(f"wrote {out / 'device_check.json'}")
sys.exit(1 if failed else 0)
EOF
