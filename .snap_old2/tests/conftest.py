"""Shared fixtures. ``tiny.py`` beside this file builds tiny random checkpoints."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # without CUDA, Triton kernels run in its interpreter; must be set before triton is imported
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


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


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama_dir, tmp_path_factory: pytest.TempPathFactory):
    """Three random PEFT adapters of the tiny model: ranks 4/8/2, different targets, one rslora."""
    from tiny import make_peft_adapter

    root = tmp_path_factory.mktemp("adapters")
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "a": make_peft_adapter(tiny_llama_dir, root / "a", 4, ["q_proj", "v_proj"], seed=1),
        "b": make_peft_adapter(tiny_llama_dir, root / "b", 8, all7, seed=2),
        "c": make_peft_adapter(tiny_llama_dir, root / "c", 2, ["down_proj", "o_proj"], seed=3, use_rslora=True),
    }
