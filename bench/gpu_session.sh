#!/bin/bash
# The GPU measurements of issue 20 as one prepared command, for a session that is lent a GPU for minutes:
#
#   bench/gpu_wheels.sh                    # here, once: what the device image lacks, as wheels in .whl/
#   bench/gpu_session.sh "$OUT"            # there (carry .whl): runs the rows by priority within the budget
#
# Each row is one command with its own time limit; a row that would start with under 30 s of the budget left is
# skipped and says so, so whatever the budget allows comes back. Everything goes into at most 8 files in the
# output folder (the device tool returns no more): session.md (the tables, in order), session.log (each row's
# output and errors), and one JSON per train_speed row. Rehearse the flow on the CPU with the tiny workload:
#   SD_WORKLOAD=tiny-sd1 XL_WORKLOAD=tiny-sd1 GPU_SESSION_SECONDS=200 bench/gpu_session.sh out/rehearsal
set -u
out=${1:?usage: bench/gpu_session.sh OUTPUT_FOLDER}
budget=${GPU_SESSION_SECONDS:-420}
sd=${SD_WORKLOAD:-sd15-512}
xl=${XL_WORKLOAD:-sdxl-1024}
mkdir -p "$out"
cd "$(dirname "$0")/.." || exit 1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  echo "# GPU session $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch; print('torch', torch.__version__)"
} > "$out/session.md"

row() {  # row NAME SECONDS COMMAND...: run COMMAND for at most SECONDS (less if the budget is nearly spent)
  local name=$1 limit=$2 left
  shift 2
  left=$((budget - SECONDS))
  if ((left < 30)); then
    printf '\n## %s: skipped, %s s of the budget left\n' "$name" "$left" >> "$out/session.md"
    return
  fi
  ((limit > left)) && limit=$left
  printf '\n## %s\n\n`%s`\n\n' "$name" "$*" >> "$out/session.md"
  echo "== $name (limit ${limit} s, at ${SECONDS} s)" >> "$out/session.log"
  timeout "$limit" "$@" >> "$out/session.md" 2>> "$out/session.log"
  echo "== $name: exit $? at ${SECONDS} s" | tee -a "$out/session.md" >> "$out/session.log"
}

speed="python3 -m bench.train_speed --steps 20 --windows 4 --warmup-steps 3"
# 1. SD1.5 at 512 px: ours against the reference loop, samples/s, peak memory against the plan, MFU.
row sd15 150 $speed --workload "$sd" --batch-size 1 4 --contenders ours,reference --out "$out/sd15.json"
# 2. What the hook calls cost at batch 1 (and 4), on the attention and kohya layer sets.
row hooks 60 python3 -m bench.hook_cost --workload "$sd" --batch-size 1 4 --layers attention kohya --rounds 20
# 3. SDXL at 1024 px, checkpointed, batch 1: the "fits in 10 GB" check, bf16 and fp8 base storage.
row sdxl 150 $speed --workload "$xl" --batch-size 1 --gradient-checkpointing --contenders ours,ours-fp8 \
  --steps 8 --windows 2 --warmup-steps 2 --out "$out/sdxl.json"
# 4. SD1.5 with the text encoder trained and checkpointing on; the WebUI backend.
row sd15-te 90 $speed --workload "$sd" --batch-size 4 --text-encoder --gradient-checkpointing --contenders ours,reference \
  --out "$out/sd15-te.json"
row sd15-webui 90 $speed --workload "$sd" --batch-size 1 4 --contenders ours-webui --webui-python python3 \
  --out "$out/sd15-webui.json"
echo "budget ${budget} s, used ${SECONDS} s" >> "$out/session.md"
