"""Tokenizer loading, chat templates and incremental detokenization with stop strings.

Invariants:
- ``IncrementalDetokenizer.text`` never ends in a partial UTF-8 character: while
  the newest tokens decode to U+FFFD at the end, that tail is held back.
- Once a stop string appears, the text is cut before it and ``stopped`` is True;
  later tokens are ignored.
- Host cost per token (issue 8): one decode of a window of at most 2 * ``_WINDOW``
  ids (plus one more each time the window moves), through the Rust tokenizer
  directly where that is what ``tokenizer.decode`` would run (``fast_decoder``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

from transformers import AutoTokenizer, PreTrainedTokenizerBase

try:  # transformers >= 5: fast tokenizers are TokenizersBackend (decode -> _decode -> Rust decode)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend
except ImportError:  # pragma: no cover - older transformers: always use tokenizer.decode
    TokenizersBackend = None  # type: ignore[assignment,misc]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    """Load the tokenizer saved beside the model (HF layout); None if the dir has none
    (``dummy`` shape configs), in which case prompts must be token ids."""
    if not any((Path(path) / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"no usable tokenizer in {path}: {exc}") from exc


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Apply the tokenizer's chat template (with the generation prompt) and tokenize."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template; use a plain completion prompt")
    if not messages:
        raise ValueError("messages is empty: give at least one message")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def fast_decoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[int]], str]:
    """``ids -> tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)``.

    For a transformers ``TokenizersBackend`` that overrides neither ``decode`` nor ``_decode`` this is exactly
    the Rust tokenizer's ``decode`` (what ``_decode`` calls when no clean-up is asked), skipping transformers'
    per-call argument conversion (which checks every id in Python: most of the per-token cost). Any other
    tokenizer gets its own ``decode``.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if (TokenizersBackend is not None and isinstance(tokenizer, TokenizersBackend)
            and type(tokenizer).decode is PreTrainedTokenizerBase.decode
            and type(tokenizer)._decode is TokenizersBackend._decode and backend is not None):
        return partial(backend.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# Decoding the whole output every step is O(n^2); decoding only a window of the
# newest tokens keeps it O(n) while still joining multi-token characters.
_WINDOW = 8


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, honouring stop strings."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.text = ""
        self.stopped = False
        self._ids: list[int] = []
        self._prefix_len = 0  # tokens whose text is final and included in self.text
        self._prefix_text = ""  # decoded text of ids[window_start:_prefix_len]
        self._window_start = 0
        self._decode_fn = fast_decoder(tokenizer) if tokenizer is not None else None

    @property
    def num_tokens(self) -> int:
        """Tokens consumed so far."""
        return len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:  # token-id-only model: no text
            return ""
        return self._decode_fn(ids)

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the text delta they add (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.extend(new_ids)
        full = self._decode(self._ids[self._window_start :])
        if full.endswith("\ufffd"):
            return ""  # wait for the rest of the character
        new_text = full[len(self._prefix_text) :]
        self._advance_window(full)
        return self._append(new_text)

    def _advance_window(self, full: str) -> None:
        """``full`` is the decoded current window: reused unless the window moves (one decode per token)."""
        if len(self._ids) - self._window_start > 2 * _WINDOW:
            self._window_start = len(self._ids) - _WINDOW
            full = self._decode(self._ids[self._window_start :])
        self._prefix_text = full

    def _append(self, new_text: str) -> str:
        if not self.stop:
            self.text += new_text
            return new_text
        before = len(self.text)
        candidate = self.text + new_text
        cut = self._first_stop(candidate, max(0, before - max((len(s) for s in self.stop), default=0)))
        if cut is not None:
            candidate = candidate[:cut]
            self.stopped = True
        self.text = candidate
        return candidate[before:]

    def _first_stop(self, text: str, search_from: int) -> int | None:
        hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
