#!/usr/bin/env bash
# One lent GPU machine, one command: the carried wheels installed (the machine has no network and
# no bitsandbytes or trl), then the GPU check's stages and the speed benchmark, each under its own
# timeout; their summaries (and the GPU's name) land in $OUT.
#   here:   make gpu-carry                                   (wheels for Python 3.12, the Alpaca rows)
#   there:  bash checks/gpu_session.sh                       (carry .gpu-carry; about 9 minutes)
set -u
CARRY=${CARRY:-.gpu-carry}
OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/wheels/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${CHECK_S:-240}" python3 checks/gpu_check.py --out /tmp/gpu_check --data "$CARRY/alpaca_5000.json" \
    --stages a_pytest,b_tiny,b2_attention,c_7b_memory,e_export
cp /tmp/gpu_check/gpu_check.json /tmp/gpu_check/gpu_check.md "$OUT"/ 2>/dev/null
timeout "${SPEED_S:-330}" python3 bench/gpu_speed.py --data "$CARRY/alpaca_5000.json" --out /tmp/gpu_speed
cp /tmp/gpu_speed/gpu_speed.json /tmp/gpu_speed/gpu_speed.md "$OUT"/ 2>/dev/null
exit 0
