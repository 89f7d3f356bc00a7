"""The package's layering: imports point down only (import-linter's layers contract in
pyproject.toml), and jaxlm modules import each other at module level (cli.py excepted: it
imports lazily so that `jaxlm --help` starts fast)."""

import ast
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_layers_contract_is_kept():
    lint = shutil.which("lint-imports")
    assert lint, "lint-imports comes with the dev extra (import-linter)"
    r = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_no_jaxlm_imports_inside_functions():
    """An import of a jaxlm module inside a function hides a dependency from the contract above and
    usually means something lives on the wrong layer: move the thing, not the import."""
    found = []
    for path in sorted((ROOT / "jaxlm").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n == "jaxlm" or n.startswith("jaxlm.") for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"function-level jaxlm imports: {', '.join(found)}"
