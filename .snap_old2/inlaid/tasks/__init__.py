"""inlaid.tasks: the multi-task evaluation suite (issue 3).

registry.py   Task records and TASKS (12 tasks, 6 kinds), get_task / resolve_tasks
dataset.py    load_split(task, split, limit) over the committed JSONL in data/
metrics.py    BLEU, ROUGE-L, exact match (number / label), answer_nll; all 0-100 but NLL
prompting.py  chat-template rendering shared by training and evaluation
sources.py    extractors over the installed source packages (build time only)
build.py      `python -m inlaid.tasks.build --out inlaid/tasks/data`: deterministic splits

Importing this package loads nothing heavy (no torch, no source packages).
"""
