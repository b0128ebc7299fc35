#!/usr/bin/env bash
# Rebuild the shipped models from the shipped corpus: the exact commands, seeds and budgets behind
# checkpoints/default and checkpoints/default-chat (their MODEL.md cards give the figures).
#
#   bash scripts/train_default.sh base    # pretrain on data/shakespeare.txt → checkpoints/default
#   bash scripts/train_default.sh chat    # fine-tune it on dialogues from the plays → checkpoints/default-chat
#
# Budgets are in steps, not minutes, so a rerun gives the same model on any machine: 2,700 steps are what 30 minutes
# (evaluations included) hold on the 2-core CPU the base model was trained on; the chat fine-tune takes about 7
# minutes there. Training runs write to runs/; only the best weights (by val loss), in bf16, are shipped.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
base)
    gptmini train data/shakespeare.txt --out runs/default --force --seed 1337 \
        --n-layer 6 --n-head 4 --n-embd 256 --block-size 256 --batch-size 8 \
        --lr 2e-3 --warmup-iters 100 --weight-decay 0.1 --max-iters 2700 --vocab corpus --save-dtype bfloat16
    rm -rf checkpoints/default
    mkdir -p checkpoints
    cp -r runs/default/best checkpoints/default
    gptmini eval data/shakespeare.txt --split val -c checkpoints/default
    ;;
chat)
    python scripts/make_dialogues.py -o runs/dialogues.jsonl   # every play: speech → the next speaker's reply
    gptmini finetune runs/dialogues.jsonl -c checkpoints/default --out runs/default-chat --force --seed 1337 \
        --max-iters 1000 --save-dtype bfloat16
    rm -rf checkpoints/default-chat
    cp -r runs/default-chat/best checkpoints/default-chat
    ;;
*)
    echo "usage: bash scripts/train_default.sh base|chat" >&2
    exit 2
    ;;
esac
