#!/usr/bin/env bash
# The GPU check of issue 28 (item 8) as one prepared command, for a machine with a CUDA GPU:
#   1. the CUDA tests (`pytest -m cuda`: every test that needs a GPU carries the `cuda` marker);
#   2. decode speed on the GPU: scripts/bench_generate.py --device cuda when it has that flag, else
#      `gptmini generate --device cuda --stats` on the default model and a random GPT-2-small shape, eager and
#      --compile (CUDA graphs);
#   3. scripts/bench_serve.py --device cuda: 1 and 8 streaming clients, fp32 GPT-2 small and the default model;
#   4. scripts/bench_startup.py --device cuda: process start to a 200 from /health beside `import torch`.
# Small settings: a few minutes in all. Logs (one per step) and JSON go to ${OUT:-/tmp/gpu_check}; each step's exit
# status and time end the output, and the script exits 1 if any step failed.
# On a machine without a CUDA GPU it prints one line saying why and exits 0.
#
#   bash scripts/gpu_check.sh                   # from anywhere: it runs in the repository root
#   OUT=/tmp/x STEP_TIMEOUT=300 bash scripts/gpu_check.sh
#   DRY_RUN=1 bash scripts/gpu_check.sh         # print the steps, run nothing (works without a GPU)

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PY="${PYTHON:-python}"
OUT="${OUT:-/tmp/gpu_check}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}" # seconds any one step may take
DRY_RUN="${DRY_RUN:-0}"

if [[ "$DRY_RUN" != 1 ]]; then
    # stderr dropped: torch may warn about drivers while it looks; the last stdout line is the answer.
    probe=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA GPU")' 2>/dev/null | tail -n 1)
    if [[ "$probe" != cuda ]]; then
        echo "gpu_check: nothing to do: ${probe:-$PY cannot import torch}"
        exit 0
    fi
fi

mkdir -p "$OUT"
summary=()
failures=0

step() { # step NAME COMMAND...: run it under the timeout, log to $OUT/NAME.log, record its status
    local name=$1
    shift
    if [[ "$DRY_RUN" == 1 ]]; then
        echo "[$name] $*"
        return 0
    fi
    echo "== $name: $*"
    local start=$SECONDS rc
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 30 "$OUT/$name.log"
    summary+=("$name: exit $rc after $((SECONDS - start)) s ($OUT/$name.log)")
    if ((rc != 0)); then
        failures=$((failures + 1))
    fi
}

if [[ "$DRY_RUN" != 1 ]]; then
    {
        nvidia-smi 2>&1 || echo "(no nvidia-smi)"
        "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
            torch.cuda.get_device_name(0))'
        git log -1 --oneline 2>/dev/null || true
    } >"$OUT/machine.txt" 2>&1
    cat "$OUT/machine.txt"
fi

step cuda-tests "$PY" -m pytest -q -rs -p no:cacheprovider -m cuda tests

if grep -q -- '"--device"' scripts/bench_generate.py; then
    step bench-generate "$PY" scripts/bench_generate.py --device cuda --shapes gpt2-small --repeats 1 \
        --tokens 128 --no-latency --no-ct2
else
    # bench_generate.py measures CPU rows only (no --device yet): time the CLI's decode on the GPU instead.
    gpt2="$OUT/gpt2-small-random"
    step make-gpt2-small "$PY" -c '
import sys, torch
from gptmini.checkpoint import save_checkpoint
from gptmini.config import GPTConfig
from gptmini.model import GPT
torch.manual_seed(0)
shape = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
save_checkpoint(GPT(GPTConfig(**shape)), sys.argv[1])' "$gpt2"
    for ckpt in checkpoints/default "$gpt2"; do
        for mode in eager compile; do
            flags=()
            [[ $mode == compile ]] && flags=(--compile)
            step "generate-$(basename "$ckpt")-$mode" "$PY" -m gptmini generate "The history of the city" \
                -c "$ckpt" --device cuda --greedy --ignore-eos -n 256 --stats ${flags[@]+"${flags[@]}"}
        done
    done
fi

step bench-serve "$PY" scripts/bench_serve.py --device cuda --configs gptmini-fp32 gptmini-default \
    --levels 1 8 --tokens 64 --json "$OUT/bench_serve.json"

step bench-startup "$PY" scripts/bench_startup.py --device cuda --repeats 3

if [[ "$DRY_RUN" == 1 ]]; then
    exit 0
fi
echo
echo "gpu_check: $failures step(s) failed; logs in $OUT"
printf '  %s\n' "${summary[@]}"
((failures == 0))
