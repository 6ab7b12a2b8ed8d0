"""Shared fixtures. ``tiny.py`` beside this file builds tiny random checkpoints."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly (with the reason) when CUDA is absent."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # core tests run without torch
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random GQA Llama checkpoint (HF dir with tokenizer), built once per session."""
    from tiny import make_tiny_llama_dir

    return make_tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"))
