"""The layering rules of DESIGN.md, checked statically (ast) and dynamically (sys.modules)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "inlaid"


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg_parts = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(pkg_parts[: len(pkg_parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _violations(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((PKG / folder).rglob("*.py")):
        for name in _imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_core_imports_no_torch_numpy_or_lower_layers_statically():
    banned = ("torch", "numpy", "triton", "transformers", "inlaid.worker", "inlaid.model",
              "inlaid.kernels", "inlaid.engine", "inlaid.server", "inlaid.bench", "inlaid.sim")
    assert _violations("core", banned) == []


def test_kernels_import_nothing_from_inlaid_outside_kernels():
    outside = [v for v in _violations("kernels", ("inlaid",)) if not v.split(" imports ")[1].startswith("inlaid.kernels")]
    assert outside == []


def test_sim_imports_no_torch():
    assert _violations("sim", ("torch", "inlaid.worker", "inlaid.model", "inlaid.kernels", "inlaid.engine")) == []


def test_importing_every_core_module_loads_no_torch():
    mods = sorted(f"inlaid.core.{p.stem}" for p in (PKG / "core").glob("*.py") if p.stem != "__init__")
    assert "inlaid.core.scheduler" in mods
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'numpy', 'triton'))))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
