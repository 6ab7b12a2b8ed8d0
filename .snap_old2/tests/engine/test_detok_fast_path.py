"""The detokenizer's host-overhead changes (issue 8) leave its text bit-identical.

- ``fast_decoder`` (the Rust tokenizer's decode, skipping transformers' wrapper) returns exactly what
  ``tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)`` returns, on random
  id sequences (special tokens and broken UTF-8 included), and falls back to ``decode`` for other tokenizers.
- ``IncrementalDetokenizer`` (one decode per token, reused window text) produces the same deltas, text and stop
  state as the previous implementation (kept here as the reference), token by token and in chunks, with and
  without stop strings.
"""

from __future__ import annotations

import random
from pathlib import Path

from inlaid.engine.tokenizer import _WINDOW, IncrementalDetokenizer, fast_decoder, load_tokenizer


class ReferenceDetokenizer:
    """IncrementalDetokenizer as it was before the change (two decodes per token, via tokenizer.decode)."""

    def __init__(self, tokenizer, stop=()) -> None:  # noqa: ANN001
        self.tokenizer, self.stop, self.text, self.stopped = tokenizer, stop, "", False
        self._ids: list[int] = []
        self._prefix_text, self._window_start = "", 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, new_ids: list[int]) -> str:
        if self.stopped:
            return ""
        self._ids.extend(new_ids)
        full = self._decode(self._ids[self._window_start :])
        if full.endswith("\ufffd"):
            return ""
        new_text = full[len(self._prefix_text) :]
        if len(self._ids) - self._window_start > 2 * _WINDOW:
            self._window_start = len(self._ids) - _WINDOW
        self._prefix_text = self._decode(self._ids[self._window_start :])
        before = len(self.text)
        candidate = self.text + new_text
        hits = [i for i in (candidate.find(s, max(0, before - max((len(s) for s in self.stop), default=0)))
                            for s in self.stop) if i >= 0]
        if hits:
            candidate, self.stopped = candidate[: min(hits)], True
        self.text = candidate
        return candidate[before:]


def test_fast_decoder_equals_tokenizer_decode(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    fast = fast_decoder(tok)
    assert getattr(fast, "func", None) == tok._tokenizer.decode  # the fast path is taken for this tokenizer
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        assert fast(ids) == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), ids


def test_fast_decoder_falls_back_for_other_tokenizers() -> None:
    class Slow:
        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):  # noqa: ANN001, ANN201
            return f"{ids}|{skip_special_tokens}|{clean_up_tokenization_spaces}"

    assert fast_decoder(Slow())([1, 2]) == "[1, 2]|True|False"


def test_incremental_detokenizer_matches_the_reference(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    rng = random.Random(1)
    text_ids = tok.encode("Das ist ein Test. ünïcödé → 数字 The quick brown fox jumps over the lazy dog " * 2)
    streams = [text_ids] + [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(20)]
    for k, ids in enumerate(streams):
        for stop in ((), ("fox",), ("e", "zz"), ("st ein",)):
            new, ref = IncrementalDetokenizer(tok, stop), ReferenceDetokenizer(tok, stop)
            i = 0
            while i < len(ids):
                step = 1 if k % 2 == 0 else rng.randint(1, 4)
                chunk = ids[i : i + step]
                assert new.add(chunk) == ref.add(chunk), (k, stop, i)
                assert (new.text, new.stopped) == (ref.text, ref.stopped)
                i += step
