"""Layering: bench/ -> voicefast/ -> (llm_engine/, audio/) -> model_assets/; arrows only point down.

Every import is scanned from the source (module level, inside functions and classes, `importlib.import_module`
and `__import__` with a literal name), with no exceptions: the engine and the audio stack never know the
server, and neither knows the other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("bench", "voicefast", "llm_engine", "audio", "model_assets")
# package -> project packages it must never import
FORBIDDEN = {
    "model_assets": {"bench", "voicefast", "llm_engine", "audio"},
    "audio": {"bench", "voicefast", "llm_engine"},
    "llm_engine": {"bench", "voicefast", "audio"},
    "voicefast": {"bench"},
}


def imported_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted module name) of every import in the tree, wherever it sits."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, mod in imported_names(ast.parse(path.read_text(), str(path))):
            if mod.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package):
    assert violations(package) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = ("import os\n"
           "def f():\n    from voicefast.assets import resolve_asr\n"
           "class C:\n    def g(self):\n        import voicefast.server\n"
           "def h():\n    import importlib\n    return importlib.import_module('voicefast.loader')\n"
           "def k():\n    return __import__('bench.cli')\n")
    names = [m for _, m in sorted(imported_names(ast.parse(src)))]
    assert names == ["os", "voicefast.assets", "voicefast.server", "importlib", "voicefast.loader", "bench.cli"]


def test_every_project_package_is_covered():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists() and p.name in PROJECT}
    assert packages == set(PROJECT) and set(FORBIDDEN) | {"bench"} == packages
