"""Chat: conversation history, prompt templates, context trimming, and the interactive REPL.

Two templates, chosen from the checkpoint's config (`template_for`):

* **tokens** — for chat models, whose `vocab_size` covers the chat tokens kept in the embedding's padding slots
  (`<|system|>` 50257, `<|user|>` 50258, `<|assistant|>` 50259, `<|end|>` 50260). A conversation is
  ``<|system|>{system}<|end|><|user|>{text}<|end|><|assistant|>{text}<|end|>…`` with no other separators; the
  prompt for a reply ends with ``<|assistant|>`` and the reply ends at ``<|end|>``. Message text is encoded as plain
  text, so typing ``<|end|>`` cannot forge a control token. `gptmini finetune` trains on exactly this layout.
* **plain** — for base models with no chat training: ``{system}\\n\\nUser: {text}\\nAssistant: {text}\\n…`` and the
  prompt ends with ``Assistant:``; the reply stops at the next ``\\nUser:``.

The whole conversation is kept. When prompt + reply would not fit the context window, the oldest turns leave the
prompt (the system prompt stays, the transcript keeps everything); nothing here ever fails on a long conversation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from gptmini.config import GPTConfig, SamplingConfig
from gptmini.errors import UserError
from gptmini.tokenizer import CHAT_TOKENS, Tokenizer

if TYPE_CHECKING:  # the library side stays importable without torch
    from gptmini.api import LM

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END = "<|end|>"

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


# ---- templates ------------------------------------------------------------------------------------------------


class Template(Protocol):
    name: str
    stop: tuple[str, ...]

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], *, reply: bool = True) -> list[int]:
        """Ids of `messages`; with `reply`, followed by the cue for the assistant's next message."""
        ...


class TokenTemplate:
    """The chat-token template (see the module docstring)."""

    name = "tokens"
    # The reply ends at <|end|>; a chat token starting another message means the same.
    stop = tuple(CHAT_TOKENS)

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], *, reply: bool = True) -> list[int]:
        return self.encode_with_mask(tokenizer, messages, reply=reply)[0]

    def encode_with_mask(
        self, tokenizer: Tokenizer, messages: Sequence[Message], *, reply: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Ids and, per id, whether it is a token the assistant wrote (its text and closing <|end|>).

        The mask is what fine-tuning learns from: the model is taught to write replies, not to predict the user.
        """
        special = tokenizer.special_ids
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            body = [*tokenizer.encode(m["content"]), special[END]]
            ids += [special[ROLE_TOKENS[m["role"]]], *body]
            mask += [False] + [m["role"] == "assistant"] * len(body)
        if reply:
            ids.append(special[ROLE_TOKENS["assistant"]])
            mask.append(False)
        return ids, mask


class PlainTemplate:
    """A plain-text transcript a base model can continue (see the module docstring)."""

    name = "plain"
    stop = ("\nUser:",)

    def render(self, messages: Sequence[Message], *, reply: bool = True) -> str:
        parts = []
        for m in messages:
            if m["role"] == "system":
                parts.append(f"{m['content']}\n\n")
            else:
                parts.append(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n")
        if reply:
            parts.append("Assistant:")
        return "".join(parts)

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], *, reply: bool = True) -> list[int]:
        return tokenizer.encode(self.render(messages, reply=reply))


def template_for(config: GPTConfig, tokenizer: Tokenizer | None = None) -> Template:
    """The chat-token template when the model can read chat tokens, else the plain-text one."""
    tokenizer = tokenizer or Tokenizer(config.vocabulary)
    return TokenTemplate() if config.vocab_size >= tokenizer.chat_vocab_size else PlainTemplate()


# ---- messages and conversations -------------------------------------------------------------------------------


def check_messages(messages: Any, *, where: str = "") -> list[Message]:
    """`messages` as a clean list of {role, content}, or a one-line UserError saying what is wrong and where."""
    at = f"{where}: " if where else ""
    if not isinstance(messages, list) or not messages:
        raise UserError(f'{at}"messages" must be a non-empty list')
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise UserError(
                f'{at}message {i + 1} must be {{"role": "system"|"user"|"assistant", "content": "text"}}'
            )
        if m["role"] == "system" and i > 0:
            raise UserError(f"{at}message {i + 1}: a system message may only come first")
        clean.append({"role": m["role"], "content": m["content"]})
    return clean


@dataclass
class Conversation:
    """The whole conversation: an optional system prompt and the user/assistant messages, oldest first.

    `start` is the first message still in the model's context; trimming only ever moves it forward, so the prompt
    prefix stays stable turn after turn while the transcript (`messages`) keeps everything.
    """

    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    start: int = 0

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def reset(self) -> None:
        self.messages.clear()
        self.start = 0

    def to_messages(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.messages]

    @classmethod
    def from_messages(cls, messages: Any, *, where: str = "") -> Conversation:
        msgs = check_messages(messages, where=where)
        system = msgs.pop(0)["content"] if msgs[0]["role"] == "system" else None
        return cls(system=system, messages=msgs)

    def prompt_ids(self, tokenizer: Tokenizer, template: Template, budget: int) -> tuple[list[int], int]:
        """Prompt ids for the next reply within `budget` tokens, and how many old messages had to leave.

        Whole turns leave from the oldest end (the system prompt stays). If the last message alone is still too
        long, its start is cut: the model sees the end of what was said last.
        """
        head = [{"role": "system", "content": self.system}] if self.system else []
        before = self.start
        while True:
            ids = template.encode(tokenizer, head + self.messages[self.start :])
            if len(ids) <= budget or self.start >= len(self.messages) - 1:
                break
            self.start += 1
            # Keep whole turns: a prompt never starts with an orphan assistant message.
            while self.start < len(self.messages) - 1 and self.messages[self.start]["role"] != "user":
                self.start += 1
        return ids[-budget:], self.start - before


def prompt_budget(block_size: int, max_new_tokens: int) -> int:
    """Tokens the prompt may take so the reply fits too; at least half the window, so history is never starved
    by a huge `max_new_tokens` (a reply that outgrows the window slides it instead)."""
    return max(block_size - max_new_tokens, block_size // 2, 1)


# ---- a chat session (model side, no I/O) ----------------------------------------------------------------------


@dataclass
class ChatSettings:
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 200
    lookup: int = 0  # prompt-lookup decoding: draft tokens per verify pass (0: off)

    def validate(self) -> None:
        from gptmini.lookup import check_lookup

        self.sampling().validate()
        if self.max_new_tokens < 1:
            raise UserError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_lookup(self.lookup)

    def sampling(self, *, seed: int | None = None, stop: Sequence[str] = ()) -> SamplingConfig:
        return SamplingConfig(
            self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, seed, list(stop)
        )


@dataclass
class ReplyStats:
    tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = float("nan")
    prompt_tokens: int = 0
    dropped: int = 0  # messages that left the context before this reply
    interrupted: bool = False


class ChatSession:
    """A conversation with a loaded model: `respond(text)` streams the reply and records both turns."""

    def __init__(self, lm: LM, *, settings: ChatSettings | None = None, system: str | None = None) -> None:
        self.lm = lm
        self.settings = settings or ChatSettings()
        self.settings.validate()
        self.template = template_for(lm.config, lm.tokenizer)
        self.conversation = Conversation(system=system or None)
        self.replies = 0  # since the last /seed or /reset: keeps a seeded session reproducible turn by turn
        self.last = ReplyStats()
        self.total_tokens = 0
        self.total_seconds = 0.0

    @property
    def block_size(self) -> int:
        return self.lm.config.block_size

    def reset(self) -> None:
        self.conversation.reset()
        self.replies = 0

    def load(self, messages: Any, *, where: str = "") -> None:
        self.conversation = Conversation.from_messages(messages, where=where)
        self.replies = 0

    def respond(self, text: str) -> Iterator[str]:
        """Add the user's message and yield the reply as it is generated.

        Closing the iterator early (Ctrl-C) keeps the partial reply in the history, so the conversation goes on.
        """
        from gptmini.decoding import GenerationStats

        s = self.settings
        self.conversation.add("user", text)
        ids, dropped = self.conversation.prompt_ids(
            self.lm.tokenizer, self.template, prompt_budget(self.block_size, s.max_new_tokens)
        )
        seed = None if s.seed is None else s.seed + self.replies
        self.replies += 1
        sampling = s.sampling(seed=seed, stop=self.template.stop)
        gen = GenerationStats()
        pieces = self.lm.stream(ids, sampling, max_new_tokens=s.max_new_tokens, stats=gen, lookup=s.lookup)
        reply = []
        t0 = time.perf_counter()
        finished = False
        try:
            for piece in pieces:
                if not reply:  # the plain template leaves a space after "Assistant:"
                    piece = piece.lstrip()
                    if not piece:
                        continue
                reply.append(piece)
                yield piece
            finished = True
        finally:
            pieces.close()
            seconds = time.perf_counter() - t0
            self.conversation.add("assistant", "".join(reply).strip())
            rate = gen.decode_tokens_per_s if gen.new_tokens > 1 else float("nan")
            self.last = ReplyStats(gen.new_tokens, seconds, rate, len(ids), dropped, not finished)
            self.total_tokens += gen.new_tokens
            self.total_seconds += seconds

    def history_tokens(self) -> int:
        """Tokens of the conversation still in context (the next prompt starts from these, trimmed if needed)."""
        c = self.conversation
        msgs = ([{"role": "system", "content": c.system}] if c.system else []) + c.messages[c.start :]
        return len(self.template.encode(self.lm.tokenizer, msgs, reply=False)) if msgs else 0


# ---- the REPL (I/O) -------------------------------------------------------------------------------------------

HISTORY_ENV = "GPTMINI_HISTORY"
PROMPT = "you› "
COMMANDS = {
    "/help": "show this help",
    "/reset": "forget the conversation (also /clear); the system prompt stays",
    "/system TEXT": "set the system prompt (empty: none)",
    "/temp X": "temperature (0 = greedy)",
    "/topk N": "keep the N most likely tokens (off: all)",
    "/topp X": "nucleus sampling threshold in (0, 1] (off: none)",
    "/max N": "maximum tokens per reply",
    "/seed N": "seed for reproducible replies (off: random)",
    "/save FILE": "write the transcript as JSON",
    "/load FILE": "continue a transcript saved with /save (or any {messages: [...]} JSON)",
    "/stats": "tokens, speed, context use and settings",
    "/quit": "leave (also /exit or Ctrl-D)",
}


def default_history_file() -> Path:
    return Path(os.environ.get(HISTORY_ENV) or Path.home() / ".gptmini_history")


def default_chat_checkpoint() -> Path:
    """`checkpoints/default-chat` when it exists (here or beside the package), else the default checkpoint."""
    from gptmini.api import DEFAULT_CHECKPOINT, default_checkpoint

    chat = DEFAULT_CHECKPOINT.with_name(DEFAULT_CHECKPOINT.name + "-chat")
    for candidate in (chat, Path(__file__).resolve().parent.parent / chat):
        if candidate.is_dir():
            return candidate
    return default_checkpoint()


class Repl:
    """Reads lines, runs commands, streams replies.

    Interactive (stdin is a terminal): rich rendering, readline editing and history, Ctrl-C stops a reply.
    Otherwise: one user turn per input line, replies as plain text on stdout (one per line), everything else on
    stderr, so the chat can be scripted.
    """

    def __init__(
        self,
        session: ChatSession,
        *,
        interactive: bool | None = None,
        stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        history_file: Path | None = None,
        source: str = "",
    ) -> None:
        from rich.console import Console

        self.session = session
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.history_file = history_file
        self.source = source
        # Interactive: everything on the terminal. Scripted: only replies on stdout.
        self.console = Console(
            file=self.stdout if self.interactive else (stderr or sys.stderr), highlight=False, soft_wrap=True
        )
        self.handlers: dict[str, Callable[[str], bool]] = {
            "/help": self._help,
            "/reset": self._reset,
            "/clear": self._reset,
            "/system": self._system,
            "/temp": self._temp,
            "/topk": self._topk,
            "/topp": self._topp,
            "/max": self._max,
            "/seed": self._seed,
            "/save": self._save,
            "/load": self._load,
            "/stats": self._stats,
            "/quit": self._quit,
            "/exit": self._quit,
        }

    # -- main loop --

    def run(self) -> int:
        """Serve until /quit or end of input; returns the exit code (0)."""
        if not self.interactive:
            for line in self.stdin:
                if not self.handle(line.rstrip("\r\n")):
                    break
            return 0
        with self._readline():
            self._banner()
            while True:
                try:
                    line = input(self._prompt())
                except EOFError:  # Ctrl-D
                    self.console.print()
                    return 0
                except KeyboardInterrupt:  # Ctrl-C at the prompt: drop the line, as a shell does
                    self.console.print("^C")
                    continue
                try:
                    if not self.handle(line):
                        return 0
                except KeyboardInterrupt:  # Ctrl-C while a command ran: back to the prompt
                    self.console.print("^C")

    def handle(self, line: str) -> bool:
        """One input line: a command or a user turn. False means quit."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            name, _, arg = text.partition(" ")
            handler = self.handlers.get(name.lower())
            if handler is None:
                self._error(f"unknown command {name}; /help lists them")
                return True
            try:
                return handler(arg.strip())
            except UserError as e:
                self._error(str(e))
                return True
        self._reply(text[1:] if text.startswith("//") else text)  # "//x" sends the literal "/x"
        return True

    def _reply(self, text: str) -> None:
        pieces = self.session.respond(text)
        if self.interactive:
            self.console.print("[bold cyan]gpt›[/] ", end="")
        try:
            for piece in pieces:
                self.stdout.write(_printable(piece) if self.interactive else piece)
                self.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C: stop this reply, keep what was said, back to the prompt
            with contextlib.suppress(KeyboardInterrupt):
                pieces.close()
        self.stdout.write("\n")
        self.stdout.flush()
        last = self.session.last
        if self.interactive:
            self.console.print(f"[dim]{self._reply_line(last)}[/]")
        elif last.interrupted:
            self.console.print("interrupted")

    @staticmethod
    def _reply_line(last: ReplyStats) -> str:
        rate = "–" if math.isnan(last.tokens_per_s) else f"{last.tokens_per_s:.1f}"
        parts = [f"{last.tokens} tokens", f"{rate} tokens/s"]
        if last.interrupted:
            parts.append("interrupted")
        if last.dropped:
            parts.append(f"{last.dropped} old messages left the context")
        return " · ".join(parts)

    # -- terminal niceties --

    def _prompt(self) -> str:
        if os.environ.get("NO_COLOR") or not self.stdout.isatty():
            return PROMPT
        # \001 \002 tell readline the escape codes take no room, so line editing stays aligned
        return f"\001\033[1;32m\002{PROMPT.rstrip()}\001\033[0m\002 "

    def _banner(self) -> None:
        s = self.session
        kind = "chat tokens" if s.template.name == "tokens" else "plain text (base model, not chat-trained)"
        self.console.print(
            f"[bold]gptmini chat[/] · {self.source or 'model'} · template: {kind} · context {s.block_size} tokens"
        )
        self.console.print("[dim]/help for commands · Ctrl-C stops a reply · Ctrl-D or /quit leaves[/]")

    @contextlib.contextmanager
    def _readline(self) -> Iterator[None]:
        """Line editing and a persistent history file, where the platform has readline."""
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input still works
            yield
            return
        path = self.history_file
        if path is not None:
            with contextlib.suppress(OSError):
                readline.read_history_file(path)
            readline.set_history_length(1000)
        try:
            yield
        finally:
            if path is not None:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    readline.write_history_file(path)
                except OSError as e:
                    self._error(f"could not save the input history to {path}: {e.strerror}")

    def _say(self, message: str) -> None:
        self.console.print(message, markup=False)

    def _error(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(
            f"[red]error:[/] {escape(message)}" if self.interactive else f"error: {escape(message)}"
        )

    # -- commands: each returns False to quit --

    def _help(self, arg: str) -> bool:
        width = max(map(len, COMMANDS))
        for usage, what in COMMANDS.items():
            self._say(f"{usage:<{width}}  {what}")
        self._say("Any other line is sent to the model; start it with // to send a literal /.")
        return True

    def _reset(self, arg: str) -> bool:
        self.session.reset()
        self._say("conversation cleared")
        return True

    def _system(self, arg: str) -> bool:
        self.session.conversation.system = arg or None
        self._say(f"system prompt set: {arg}" if arg else "system prompt removed")
        return True

    def _set(self, name: str, value: Any) -> None:
        """Change one setting; an invalid value leaves the settings as they were."""
        candidate = ChatSettings(**{**asdict(self.session.settings), name: value})
        candidate.validate()
        self.session.settings = candidate

    def _temp(self, arg: str) -> bool:
        self._set("temperature", _number(arg, float, "/temp X (a number >= 0, 0 = greedy)"))
        self._say(f"temperature {self.session.settings.temperature}")
        return True

    def _topk(self, arg: str) -> bool:
        self._set("top_k", _number(arg, int, "/topk N (an integer >= 1, or off)", allow_off=True))
        self._say(f"top-k {self.session.settings.top_k or 'off'}")
        return True

    def _topp(self, arg: str) -> bool:
        self._set("top_p", _number(arg, float, "/topp X (in (0, 1], or off)", allow_off=True))
        self._say(f"top-p {self.session.settings.top_p or 'off'}")
        return True

    def _max(self, arg: str) -> bool:
        self._set("max_new_tokens", _number(arg, int, "/max N (an integer >= 1)"))
        self._say(f"max tokens per reply {self.session.settings.max_new_tokens}")
        return True

    def _seed(self, arg: str) -> bool:
        self._set("seed", _number(arg, int, "/seed N (an integer, or off)", allow_off=True))
        self.session.replies = 0
        self._say(f"seed {self.session.settings.seed if self.session.settings.seed is not None else 'off'}")
        return True

    def _save(self, arg: str) -> bool:
        if not arg:
            raise UserError("usage: /save FILE")
        path = Path(arg).expanduser()
        data = {
            "messages": self.session.conversation.to_messages(),
            "settings": asdict(self.session.settings),
        }
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from None
        self._say(f"saved {len(data['messages'])} messages to {path}")
        return True

    def _load(self, arg: str) -> bool:
        if not arg:
            raise UserError("usage: /load FILE")
        path = Path(arg).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        self.session.load(messages, where=str(path))
        self._say(f"loaded {len(self.session.conversation.messages)} messages from {path}")
        return True

    def _stats(self, arg: str) -> bool:
        s = self.session
        rate = s.total_tokens / s.total_seconds if s.total_seconds > 0 else float("nan")
        turns = sum(m["role"] == "user" for m in s.conversation.messages)
        settings = ", ".join(f"{k}={v}" for k, v in asdict(s.settings).items())
        lines = [
            f"last reply: {self._reply_line(s.last)}",
            f"session: {turns} turns, {s.total_tokens} tokens generated, {rate:.1f} tokens/s overall",
            f"context: window {s.block_size} tokens, last prompt {s.last.prompt_tokens}, "
            f"history {s.history_tokens()} tokens, {s.conversation.start} old messages outside the window",
            f"template: {s.template.name}; settings: {settings}",
        ]
        for line in lines:
            self._say(line)
        return True

    def _quit(self, arg: str) -> bool:
        return False


# C0 control characters other than tab and newline, and DEL: a model can emit escape sequences that would drive the
# terminal (move the cursor, retitle the window); show them as � instead.
_CONTROL = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}


def _printable(text: str) -> str:
    return text.translate(_CONTROL)


def _number(arg: str, kind: type, usage: str, *, allow_off: bool = False) -> Any:
    if allow_off and arg.lower() in ("off", "none"):
        return None
    try:
        return kind(arg)
    except ValueError:
        raise UserError(f"usage: {usage}") from None


def run_chat(
    checkpoint: Path | None = None,
    *,
    settings: ChatSettings | None = None,
    system: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    history_file: Path | None = None,
) -> int:
    """`gptmini chat`: load the model (`dtype`, `quantize` as `gptmini.load` takes them), then serve the REPL on
    stdin/stdout. Returns the exit code."""
    from gptmini.api import load

    settings = settings or ChatSettings()
    settings.validate()  # before the (slow) load, so a bad flag answers at once
    path = checkpoint or default_chat_checkpoint()
    lm = load(path, device=device, dtype=dtype, quantize=quantize)
    session = ChatSession(lm, settings=settings, system=system)
    repl = Repl(session, history_file=history_file or default_history_file(), source=str(path))
    return repl.run()
