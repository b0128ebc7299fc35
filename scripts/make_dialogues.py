"""Build a chat fine-tuning set from the shipped plays: one character's speech → the next character's reply.

    python scripts/make_dialogues.py -o data/dialogues.jsonl          # from data/shakespeare.txt, no download
    gptmini finetune -c checkpoints/default data/dialogues.jsonl --out checkpoints/default-chat

Each output line is an OpenAI-style conversation, ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``.
With ``--turns K`` a conversation holds K exchanges (2K consecutive speeches, alternating user / assistant). The
text is read as paragraphs: a paragraph whose first line is a speaker tag (``HAMLET.``, ``Ber.``) is a speech; ACT and
SCENE headings and titles end a dialogue (replies never cross a scene); ``[stage directions]`` are dropped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT / "data" / "shakespeare.txt"
# "HAMLET.", "KING HENRY.", "Ber.", "First Lord." — a short name ending with a full stop, alone on its line
SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z'&-]*)(?: [A-Za-z'&-]+){0,3}\.$")
HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene|EPILOGUE|Epilogue|PROLOGUE|Prologue|THE END|by )\b")
STAGE = re.compile(r"\[[^\]]*\]?")


def paragraphs(text: str) -> Iterator[list[str]]:
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip("\n").splitlines() if line.strip()]
        if lines:
            yield lines


def scenes(text: str) -> Iterator[list[tuple[str, str]]]:
    """Runs of consecutive (speaker, speech) with no heading between them."""
    run: list[tuple[str, str]] = []
    for lines in paragraphs(text):
        first = lines[0]
        if first.startswith("["):  # a stage direction: the dialogue goes on
            continue
        if len(lines) > 1 and SPEAKER.match(first) and not HEADING.match(first):
            speech = " ".join(STAGE.sub("", " ".join(lines[1:])).split())
            if speech:
                run.append((first.rstrip(".").upper(), speech))
            continue
        if run and not HEADING.match(first) and not first.isupper():
            # a speech going on after a blank line (verse paragraphs, songs)
            speaker, speech = run[-1]
            more = " ".join(STAGE.sub("", " ".join(lines)).split())
            run[-1] = (speaker, f"{speech} {more}".strip())
            continue
        if run:  # a heading, a title, a cast list: the scene is over
            yield run
        run = []
    if run:
        yield run


def conversations(
    text: str, *, turns: int = 1, max_chars: int = 500, system: str | None = None
) -> tuple[list[dict], int]:
    """The conversations and how many windows were left out for a speech longer than `max_chars`."""
    out, too_long = [], 0
    width = 2 * turns
    for run in scenes(text):
        for start in range(len(run) - width + 1):
            window = run[start : start + width]
            if any(a[0] == b[0] for a, b in itertools.pairwise(window)):
                continue  # the same character twice in a row is not an exchange
            if any(len(speech) > max_chars for _, speech in window):
                too_long += 1
                continue
            messages = [{"role": "system", "content": system}] if system else []
            messages += [
                {"role": "user" if i % 2 == 0 else "assistant", "content": speech}
                for i, (_, speech) in enumerate(window)
            ]
            out.append({"messages": messages})
    return out, too_long


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE, help="play texts")
    parser.add_argument("-o", "--out", type=Path, help="JSONL file to write (default: stdout)")
    parser.add_argument("--turns", type=int, default=1, help="exchanges per conversation (default 1)")
    parser.add_argument("--max-chars", type=int, default=500, help="leave out longer speeches (default 500)")
    parser.add_argument("--system", help="a system message for every conversation")
    parser.add_argument("--limit", type=int, help="write at most this many conversations")
    args = parser.parse_args(argv)
    if args.turns < 1 or args.max_chars < 1:
        print("error: --turns and --max-chars must be >= 1", file=sys.stderr)
        return 2
    try:
        text = args.source.read_text(encoding="utf-8")
    except OSError as e:
        print(f"error: cannot read {args.source}: {e.strerror}", file=sys.stderr)
        return 2
    convs, too_long = conversations(text, turns=args.turns, max_chars=args.max_chars, system=args.system)
    convs = convs[: args.limit] if args.limit is not None else convs
    lines = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in convs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    print(
        f"{len(convs)} conversations ({too_long} left out: a speech over {args.max_chars} characters)"
        + (f" → {args.out}" if args.out else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
