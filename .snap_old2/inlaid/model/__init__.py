"""inlaid.model: Llama-family base models (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache.

Modules (imported explicitly; this package imports nothing at load time):
- ``arch``: ``ModelArch`` parsed from HF config.json; ``lora_module_shapes()``.
- ``layers``: RMSNorm, RoPE (default/linear/llama3), ``ParallelLinear`` (+ ``quant_method`` seam), SwiGLU MLP.
- ``llama``: ``LlamaForCausalLM`` (our forward; ``forward(batch, kv_caches)``, ``compute_logits``).
- ``loader``: ``resolve_model_path``, ``load_weights``, ``build_model``, ``load_model``.
- ``gguf``: GGUF -> HF safetensors conversion cache; the bundled default model.
- ``batch`` / ``lora_hook``: the ForwardBatch and LoRA hook contracts.
- ``configs/``: config.json of Llama-2-7B/13B shapes for ``load_format="dummy"``.
"""
