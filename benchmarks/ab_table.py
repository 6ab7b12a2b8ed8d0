"""Markdown table of same-call A/B end-to-end pages: a change (``new``) against its parent (``old``), alternated.

Reads ``e2e_decode.py`` result pages named ``<prefix><tag>_{new,old}_<i><suffix>.json`` (the device jobs write
them with ``--rows``: one row or several) and prints one line per tag, batch and adapter count: every run's
decode tok/s, the means and their ratio. The session notes quote these tables; rerun this to regenerate them from the committed pages.

    python benchmarks/ab_table.py benchmarks/results/e2e_attn_ _h100
"""
import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

Key = tuple[str, int, int]
"""(page tag, batch, adapters): one table line."""


def collect(prefix: str, suffix: str) -> dict[Key, dict[str, list[dict]]]:
    """{(tag, batch, adapters): {"new"/"old": [rows in run order]}} from the pages matching ``prefix``/``suffix``."""
    base = Path(prefix)
    pat = re.compile(re.escape(base.name) + r"(.+)_(new|old)_(\d+)" + re.escape(suffix) + r"\.json$")
    found: dict[Key, dict[str, list[tuple[int, dict]]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(base.parent.glob(base.name + "*" + suffix + ".json")):
        m = pat.match(path.name)
        if m:
            for row in json.loads(path.read_text())["rows"]:
                found[(m.group(1), row["batch"], row["adapters"])][m.group(2)].append((int(m.group(3)), row))
    return {key: {side: [r for _, r in sorted(runs, key=lambda t: t[0])] for side, runs in sides.items()}
            for key, sides in found.items()}


def table(pages: dict[Key, dict[str, list[dict]]]) -> str:
    lines = ["| row | batch | adapters | old tok/s | new tok/s | new / old | new, share of roofline |",
             "|---|---|---|---|---|---|---|"]
    for (tag, _, _), sides in sorted(pages.items()):
        old, new = sides.get("old", []), sides.get("new", [])
        if not old or not new:
            continue
        mo = sum(r["decode_tps"] for r in old) / len(old)
        mn = sum(r["decode_tps"] for r in new) / len(new)
        frac = sum(r["frac_roofline"] for r in new) / len(new)
        runs_old = " / ".join(f"{r['decode_tps']:,.0f}" for r in old)
        runs_new = " / ".join(f"{r['decode_tps']:,.0f}" for r in new)
        lines.append(f"| {tag} | {new[0]['batch']} | {new[0]['adapters']} | {runs_old} | {runs_new} | "
                     f"{mn / mo:.3f} | {frac:.1%} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prefix", help="path prefix of the pages, e.g. benchmarks/results/e2e_attn_")
    ap.add_argument("suffix", nargs="?", default="", help="name part after the run number, e.g. _h100")
    args = ap.parse_args()
    pages = collect(args.prefix, args.suffix)
    if not pages:
        print(f"no pages match {args.prefix}*{args.suffix}.json", file=sys.stderr)
        return 1
    print(table(pages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
