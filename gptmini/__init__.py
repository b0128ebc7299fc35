"""gptmini: a small, hackable GPT. Train on any text, generate, chat.

`import gptmini` stays light: torch is imported only when a model is loaded or trained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["GPT", "LM", "GPTConfig", "__version__", "load", "train"]

if TYPE_CHECKING:
    from gptmini.api import LM
    from gptmini.config import GPTConfig
    from gptmini.model import GPT


def load(path: str = "checkpoints/default", **kwargs: Any) -> LM:
    """Load a gptmini checkpoint or a Hugging Face GPT-2 directory for generation (see `gptmini.api.load`)."""
    from gptmini.api import load as _load

    return _load(path, **kwargs)


def train(*args: Any, **kwargs: Any) -> Any:
    """Train a model on text files (see `gptmini.train.train`)."""
    from gptmini.train import train as _train

    return _train(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "GPT":
        from gptmini.model import GPT

        return GPT
    if name == "GPTConfig":
        from gptmini.config import GPTConfig

        return GPTConfig
    if name == "LM":
        from gptmini.api import LM

        return LM
    raise AttributeError(f"module 'gptmini' has no attribute {name!r}")
