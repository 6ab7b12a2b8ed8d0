"""Incremental detokenization: deltas concatenate to the full decode; stop strings; UTF-8."""

from __future__ import annotations

from pathlib import Path

from inlaid.engine.tokenizer import IncrementalDetokenizer, load_tokenizer


def test_deltas_concatenate_to_full_decode(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    text = "Das ist ein Test. Ceci est un essai. ünïcödé → 数字 " * 3
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add([t]) for t in ids]
    assert "".join(deltas) == tok.decode(ids) == detok.text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_across_tokens(tiny_llama_dir: Path) -> None:
    tok = load_tokenizer(tiny_llama_dir)
    ids = tok.encode("The quick brown fox jumps over the lazy dog")
    detok = IncrementalDetokenizer(tok, stop=("fox jumps",))
    for t in ids:
        detok.add([t])
    assert detok.stopped and detok.text == "The quick brown "
