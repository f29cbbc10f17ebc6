"""deltahub's module-level imports form a DAG (issue 14: no import cycle).

Only imports executed when a module is imported count (module level, including ``try``/``if``
blocks, but not ``if TYPE_CHECKING:``); imports inside functions are lazy and allowed. A
package's ``__init__`` is imported before any of its submodules, so ``from .x import y`` inside
package ``p`` is an edge to ``p.x`` (when a module) and ``import p.q`` an edge to ``p`` and ``p.q``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import deltahub

ROOT = Path(deltahub.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _toplevel(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import time: recurse into if/try/with, skip ``if TYPE_CHECKING``, functions and classes' methods."""
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                out += _toplevel(node.orelse)
            else:
                out += _toplevel(node.body) + _toplevel(node.orelse)
        elif isinstance(node, ast.Try):
            out += _toplevel(node.body) + _toplevel(node.orelse) + _toplevel(node.finalbody)
            for h in node.handlers:
                out += _toplevel(h.body)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            out += _toplevel(node.body)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _toplevel(ast.parse(path.read_text(encoding="utf-8")).body):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                parts = t.split(".")
                for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b, a.b.c
                    name = ".".join(parts[:i])
                    # a module's own parent packages are already being imported: not an edge
                    if name in mods and name != mod and not mod.startswith(name + "."):
                        graph[mod].add(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_module_level_imports_are_acyclic() -> None:
    graph = import_graph()
    assert "deltahub.compression" in graph and "deltahub.resident.loading" in graph
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_a_local_compress_does_not_load_the_hub_client(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Compressing local directories never needs huggingface_hub's client modules (~0.25 s of imports)."""
    import subprocess
    import sys

    import torch

    from deltahub.format.io import save_tensors

    for d, shift in (("b", 0.0), ("f", 0.01)):
        (tmp_path / d).mkdir()
        save_tensors(tmp_path / d / "model.safetensors", {"w": torch.ones(8, 8) + shift, "n": torch.ones(8)})
    code = ("import sys; from deltahub.compression import compress; "
            f"compress({str(tmp_path / 'b')!r}, {str(tmp_path / 'f')!r}, {str(tmp_path / 'out')!r}, progress=False); "
            "print(sorted(m for m in sys.modules if m.startswith(('deltahub.hub', 'huggingface_hub.hf_api'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
