"""`_core.pyi` must describe the extension exactly: every public name, class member and
exception in the module is in the stub, and vice versa."""

from __future__ import annotations

import ast
from pathlib import Path

from alora import _core

STUB = Path(__file__).resolve().parents[1] / "python" / "alora" / "_core.pyi"


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse(STUB.read_text())
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            names = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
            members[node.name] = names
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
    return top, members


def test_module_names_match_stub() -> None:
    top, _ = stub_names()
    public = {n for n in dir(_core) if not n.startswith("_")} | {"__version__"}
    assert public == top


def test_class_members_match_stub() -> None:
    _, members = stub_names()
    for cls, names in members.items():
        obj = getattr(_core, cls)
        if issubclass(obj, BaseException):
            assert names == set(), cls
            continue
        actual = {n for n in vars(obj) if not n.startswith("_")}
        declared = {n for n in names if not n.startswith("_")}
        assert actual == declared, cls
