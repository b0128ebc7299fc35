#!/usr/bin/env bash
# Rebuild the shipped models from the shipped corpus: the exact commands, seeds and budgets behind
# checkpoints/default and checkpoints/default-chat (their MODEL.md cards give the figures).
#
#   bash scripts/train_default.sh base    # pretrain on data/shakespeare.txt → checkpoints/default
#   bash scripts/train_default.sh chat    # fine-tune it on dialogues from the plays → checkpoints/default-chat
#
# Budgets are in steps, not minutes, so a rerun gives the same model on any machine: 7,000 steps are what 30 minutes
# (evaluations included) hold on the 2-core CPU the base model was trained on; the chat fine-tune takes about 2.5
# minutes there. Every setting is spelled out, so later changes to the defaults do not change these models.
# Training runs write to runs/; only the best weights (by val loss), in bf16, are shipped.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
base)
    gptmini train data/shakespeare.txt --out runs/default --force --seed 1337 \
        --n-layer 4 --n-head 4 --n-embd 192 --block-size 256 --batch-size 8 --vocab 4096 \
        --optimizer muon --lr 5e-3 --warmup-iters 50 --min-lr-ratio 0.1 --weight-decay 0.5 --ema 0 \
        --max-iters 7000 --save-dtype bfloat16
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
