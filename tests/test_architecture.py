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


# Private names of other libraries that jaxlm uses on purpose, each in one place, with the reason.
THIRD_PARTY_PRIVATE = {
    ("jaxlm/kernels/__init__.py", "_cache_size"): "jax has no public count of a jitted function's compiled programs",
    ("jaxlm/io/checkpoints.py", "orbax.checkpoint._src.metadata"): "orbax exports no ArrayHandler metadata store",
    ("jaxlm/instruct.py", "_fields"): "ast's documented list of a node's fields",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_reads_another_objects_private_attributes():
    """A module may use its own private names (``self._x``, a private helper or class of its own),
    never another module's: ``engine._thread`` from the app, ``lm._on_mesh()`` from the engine,
    ``from jaxlm.x import _y``. What a module needs of another is a public method or property. The
    third-party private names above are the only exceptions."""
    found, used = [], set()
    for path in sorted((ROOT / "jaxlm").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        own = set()  # private names this module defines (functions, classes, attributes, globals)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.arg):
                own.add(node.arg)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                what = node.attr
            elif isinstance(node, ast.ImportFrom) and node.module and any(map(_private, node.module.split("."))):
                what = node.module
            elif isinstance(node, ast.ImportFrom) and any(_private(a.name) for a in node.names):
                what = next(a.name for a in node.names if _private(a.name))
            else:
                continue
            if (rel, what) in THIRD_PARTY_PRIVATE:
                used.add((rel, what))
            else:
                found.append(f"{rel}:{node.lineno} {what}")
    assert not found, f"private names of other modules or objects: {', '.join(found)}"
    assert used == set(THIRD_PARTY_PRIVATE), f"exceptions no longer used: {set(THIRD_PARTY_PRIVATE) - used}"
