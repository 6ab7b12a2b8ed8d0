"""Train one PEFT LoRA adapter per task (issue 3, item 3): the demo adapters.

For each task: load the base (an HF directory of SmolLM2-135M-Instruct), wrap
it with a LoRA of the task's rank and target modules (``inlaid.tasks.registry``),
train on the task's train split with loss on the answer tokens only (prompt
rendered exactly as evaluation renders it: ``inlaid.tasks.prompting``), and
report answer NLL on fixed train/validation subsets before and after. Saves
``adapter_model.safetensors`` (bf16) + ``adapter_config.json`` into
``<out>/<task>/`` and a JSON log. The GPU run:

    python benchmarks/train_adapters.py --model-dir /path/smollm2-hf --device cuda --steps 300

CPU smoke test (used by tests/tasks/test_train_adapters.py):

    python benchmarks/train_adapters.py --model-dir tiny --tasks math_gsm --steps 2 --max-examples 8
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from inlaid.tasks.dataset import Example, load_split
from inlaid.tasks.metrics import answer_nll
from inlaid.tasks.prompting import encode_example, end_of_turn_token
from inlaid.tasks.registry import Task, resolve_tasks

log = logging.getLogger("train_adapters")
REPO = Path(__file__).resolve().parent.parent
Encoded = tuple[list[int], list[int]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train one LoRA adapter per task (PEFT format, bf16).")
    p.add_argument("--model-dir", required=True, type=Path, help="HF dir of the base model (with tokenizer)")
    p.add_argument("--base-name", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="written to adapter_config.json base_model_name_or_path")
    p.add_argument("--out", type=Path, default=REPO / "inlaid" / "adapters", help="adapters root")
    p.add_argument("--tasks", default="all", help="comma-separated task names or 'all'")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-length", type=int, default=384, help="drop examples longer than this (tokens)")
    p.add_argument("--max-examples", type=int, default=None, help="cap on train examples per task")
    p.add_argument("--eval-examples", type=int, default=64, help="examples for before/after NLL")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", type=Path, default=None, help="JSON log (default <out>/train_log.json)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        p.error("--steps and --batch-size must be >= 1 and --lr > 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda given but CUDA is not available")
    if not (args.model_dir / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir} has no config.json (an HF model directory is needed)")
    return args


def encode_split(tokenizer: Any, task: Task, examples: list[Example], max_length: int) -> list[Encoded]:
    """Tokenized (prompt, answer) pairs, dropping those longer than ``max_length``."""
    out = [encode_example(tokenizer, task, ex.prompt, ex.completion) for ex in examples]
    kept = [e for e in out if len(e[0]) + len(e[1]) <= max_length]
    if len(kept) < len(out):
        log.info("%s: dropped %d of %d examples over %d tokens", task.name, len(out) - len(kept), len(out), max_length)
    if not kept:
        raise ValueError(f"{task.name}: every example is longer than --max-length {max_length}")
    return kept


def collate(batch: list[Encoded], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (-100 outside the answers)."""
    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (p, a) in enumerate(batch):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def token_logprobs(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every next token [B, T-1] and the answer-token mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    keep = target != -100
    lp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp, keep


@torch.no_grad()
def eval_nll(model: Any, data: list[Encoded], pad_id: int, device: str, batch_size: int) -> float:
    """Answer NLL per token (nats) over ``data``, via ``inlaid.tasks.metrics.answer_nll``."""
    model.eval()
    per_example: list[list[float]] = []
    for i in range(0, len(data), batch_size):
        lp, keep = token_logprobs(model, collate(data[i : i + batch_size], pad_id, device))
        per_example.extend(lp[j][keep[j]].tolist() for j in range(lp.shape[0]))
    return answer_nll(per_example)


def lora_model(model_dir: Path, task: Task, device: str, seed: int) -> Any:
    """A fresh base with the task's LoRA attached (only the LoRA weights train)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).to(device)
    config = LoraConfig(
        r=task.lora_rank, lora_alpha=2 * task.lora_rank, lora_dropout=0.05,
        target_modules=list(task.lora_target_modules), task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(base, config)


def train_steps(model: Any, data: list[Encoded], args: argparse.Namespace, pad_id: int, desc: str) -> list[float]:
    """AdamW with warmup + cosine decay for ``args.steps`` steps; returns per-step losses."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 10), args.steps)
    rng = random.Random(args.seed)
    losses: list[float] = []
    model.train()
    for _ in tqdm(range(args.steps), desc=desc, unit="step", leave=False):
        batch = collate(rng.sample(data, min(args.batch_size, len(data))), pad_id, args.device)
        lp, keep = token_logprobs(model, batch)
        loss = -(lp * keep).sum() / keep.sum()  # mean over answer tokens of the batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc}: loss became {losses[-1]}; lower --lr")
    return losses


def save_adapter(model: Any, out_dir: Path, base_name: str) -> int:
    """Save PEFT files, rewrite the weights in bf16, point the config at ``base_name``; returns bytes."""
    model.save_pretrained(str(out_dir))
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    cfg_path = out_dir / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return weights.stat().st_size


def check_stop_token(tokenizer: Any, model_dir: Path) -> str:
    """The answers' end-of-turn token, checked to be one the model's generation config stops on."""
    end = end_of_turn_token(tokenizer)
    end_id = tokenizer.convert_tokens_to_ids(end)
    gen_path = model_dir / "generation_config.json"
    stops = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.is_file() else tokenizer.eos_token_id
    stops = set(stops) if isinstance(stops, list) else {stops}
    if end_id not in stops:
        raise ValueError(f"the chat template ends a turn with {end!r} (id {end_id}) but {model_dir} stops generation "
                         f"on ids {sorted(s for s in stops if s is not None)}; an adapter trained on these answers "
                         "would not stop: fix the model's generation_config.json")
    log.info("answers end with %r (id %d); tokenizer.eos_token is %r", end, end_id, tokenizer.eos_token)
    return end


def train_task(task: Task, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Train, evaluate before/after, save; returns the task's log entry."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = encode_split(tokenizer, task, load_split(task.name, "train", args.max_examples), args.max_length)
    val = encode_split(tokenizer, task, load_split(task.name, "validation", args.eval_examples), args.max_length)
    train_probe = train[: args.eval_examples]
    model = lora_model(args.model_dir, task, args.device, args.seed)
    bs = args.batch_size
    before = {"train": eval_nll(model, train_probe, pad_id, args.device, bs), "val": eval_nll(model, val, pad_id, args.device, bs)}
    start = time.perf_counter()
    losses = train_steps(model, train, args, pad_id, task.name)
    seconds = time.perf_counter() - start
    after = {"train": eval_nll(model, train_probe, pad_id, args.device, bs), "val": eval_nll(model, val, pad_id, args.device, bs)}
    nbytes = save_adapter(model, args.out / task.name, args.base_name)
    entry = {
        "task": task.name, "rank": task.lora_rank, "target_modules": list(task.lora_target_modules),
        "train_examples": len(train), "steps": args.steps, "batch_size": bs, "lr": args.lr,
        "train_nll_before": before["train"], "train_nll_after": after["train"],
        "val_nll_before": before["val"], "val_nll_after": after["val"],
        "last_step_loss": losses[-1], "train_seconds": seconds, "adapter_bytes": nbytes,
    }
    log.info("%s: val NLL %.3f -> %.3f, train NLL %.3f -> %.3f, %.1fs, %.2f MB", task.name, before["val"],
             after["val"], before["train"], after["train"], seconds, nbytes / 1e6)
    return entry


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoTokenizer

    tasks = resolve_tasks(args.tasks)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    check_stop_token(tokenizer, args.model_dir)
    log_path = args.log or args.out / "train_log.json"
    entries = []
    for task in tqdm(tasks, desc="tasks", unit="task"):
        entries.append(train_task(task, tokenizer, args))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"model_dir": str(args.model_dir), "base_name": args.base_name, "device": args.device,
                  "torch": torch.__version__, "tasks": entries,
                  "total_adapter_bytes": sum(e["adapter_bytes"] for e in entries)}
        log_path.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
