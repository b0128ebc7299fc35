#!/usr/bin/env bash
# Rebuild the shipped models from the shipped corpus: the exact commands, seeds and budgets behind
# checkpoints/default and checkpoints/default-chat (their MODEL.md cards give the figures).
#
#   bash scripts/train_default.sh base    # pretrain on data/shakespeare.txt → checkpoints/default
#   bash scripts/train_default.sh chat    # fine-tune it on dialogues from the plays → checkpoints/default-chat
#
# Budgets are in steps, not minutes, so a rerun gives the same model on any machine: 7,000 steps took 22 minutes
# (evaluations included) on the 2-core CPU the base model was trained on (AMD EPYC, 2026-12-02); the chat fine-tune
# takes a few minutes there. Every setting is spelled out, so later changes to the defaults do not change these models.
# Training runs write to runs/; only the best weights (by val loss), in bf16, are shipped.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
base)
    gptmini train data/shakespeare.txt --out runs/default --force --seed 1337 \
        --n-layer 4 --n-head 4 --n-embd 192 --block-size 256 --batch-size 8 --vocab 4096 \
        --arch modern --optimizer muon --lr 5e-3 --warmup-iters 50 --min-lr-ratio 0.1 --weight-decay 0.5 --ema 0.999 \
        --max-iters 7000 --save-dtype bfloat16
    mkdir -p checkpoints/default   # the weights and config are replaced; the card (MODEL.md) stays
    cp runs/default/best/config.json runs/default/best/model.safetensors checkpoints/default/
    gptmini eval data/shakespeare.txt --split val -c checkpoints/default
    ;;
chat)
    python scripts/make_dialogues.py -o runs/dialogues.jsonl   # every play: speech → the next speaker's reply
    gptmini finetune runs/dialogues.jsonl -c checkpoints/default --out runs/default-chat --force --seed 1337 \
        --max-iters 1000 --save-dtype bfloat16
    mkdir -p checkpoints/default-chat
    cp runs/default-chat/best/config.json runs/default-chat/best/model.safetensors checkpoints/default-chat/
    ;;
*)
    echo "usage: bash scripts/train_default.sh base|chat" >&2
    exit 2
    ;;
esac
