"""Tiny random Llama-family checkpoints for tests (HF directory layout).

``make_tiny_llama_dir(path, **config_overrides)`` writes config.json,
model.safetensors (random weights from transformers' own init, seeded) and a
small byte-level BPE tokenizer with a chat template, so every part of inlaid
(loader, engine, server) can be tested against transformers without any hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Hello world, this is a tiny tokenizer for tests.",
    "Translate: cat -> chat. The quick brown fox jumps over the lazy dog.",
    "0123456789 + - * / = ( ) [ ] { } : ; , . ! ? ' \" def return import class",
    "Das ist ein Test. Ceci est un essai. Esto es una prueba.",
]


def make_tokenizer(path: Path, vocab_size: int = 384) -> Any:
    """Train a byte-level BPE on a fixed corpus (deterministic) and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """A tiny Llama config dict (GQA by default); override any HF field."""
    cfg: dict[str, Any] = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        torch_dtype="float32",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return cfg


def make_tiny_llama_dir(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random HF Llama checkpoint + tokenizer into ``path`` and return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg_dict = tiny_llama_config(**overrides)
    config = AutoConfig.for_model(**{k: v for k, v in cfg_dict.items() if k != "architectures"})
    config.architectures = cfg_dict["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # HF initialises with std 0.02, which makes every logit ~equal; larger weights
    # give peaked distributions so greedy parity tests are meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(path), safe_serialization=True)
    make_tokenizer(path, vocab_size=cfg_dict["vocab_size"])
    (path / "inlaid_test_fixture.json").write_text(json.dumps({"seed": seed}))
    return path


def make_peft_adapter(base_dir: Path, out_dir: Path, rank: int, targets: list[str], seed: int,
                      alpha: int = 16, use_rslora: bool = False) -> Path:
    """Save a random (non-zero B) PEFT LoRA adapter for the checkpoint in ``base_dir``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                     use_rslora=use_rslora, lora_dropout=0.0)
    torch.manual_seed(seed)
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # peft's non-default init is small; make the adapters matter
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(str(out_dir))
    return out_dir
