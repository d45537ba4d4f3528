"""The dependency direction holds: pure -> adapter -> service -> root -> cli.

Every module under ``otad/`` declares ``__layer__``; a module may import otad modules of its own
layer or below. The agent and the cloud never import each other; the fleet simulator is device
side and may use the agent, never the cloud.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS = ["pure", "adapter", "service", "root", "cli"]
PACKAGE = Path(__file__).resolve().parents[2] / "otad"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def declared_layer(tree: ast.Module) -> str | None:
    for node in tree.body:
        names_layer = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__layer__" for t in node.targets
        )
        if names_layer and isinstance(node.value, ast.Constant):
            return str(node.value.value)
    return None


def otad_imports(tree: ast.Module, this: str, is_package: bool) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "otad")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = this.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "otad":
                continue
            found.add(mod)
            # `from otad.agent import slots` imports the submodule otad.agent.slots
            for alias in node.names:
                found.add(f"{mod}.{alias.name}")
    return found


def load_modules() -> dict[str, tuple[str | None, set[str]]]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        name = module_name(path)
        modules[name] = (
            declared_layer(tree),
            otad_imports(tree, name, path.name == "__init__.py"),
        )
    return modules


MODULES = load_modules()


def resolve(imported: str) -> str | None:
    """The module an import names (``otad.errors.Foo`` -> ``otad.errors``)."""
    parts = imported.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def side(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in {"agent", "cloud", "fleet"} else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_module_declares_a_known_layer(module: str) -> None:
    layer, _ = MODULES[module]
    assert layer in LAYERS, f"{module} must set __layer__ to one of {LAYERS}, has {layer!r}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_imports_follow_the_direction(module: str) -> None:
    layer, imports = MODULES[module]
    assert layer in LAYERS
    for imported in sorted(imports):
        target = resolve(imported)
        assert target is not None, f"{module} imports {imported}, which does not exist"
        target_layer = MODULES[target][0]
        assert target_layer in LAYERS
        assert LAYERS.index(target_layer) <= LAYERS.index(layer), (
            f"{module} ({layer}) imports {target} ({target_layer}) against the layer direction"
        )
        here, there = side(module), side(target)
        if here and there and here != there:
            allowed = here == "fleet" and there == "agent"
            assert allowed, f"{module} ({here} side) must not import {target} ({there} side)"


def test_layers_checker_catches_a_violation(tmp_path: Path) -> None:
    tree = ast.parse("from otad.cli import main\n__layer__ = 'pure'\n")
    assert declared_layer(tree) == "pure"
    assert "otad.cli.main" in otad_imports(tree, "otad.x", False)
    assert resolve("otad.cli.main") == "otad.cli"
    assert LAYERS.index(MODULES["otad.cli"][0]) > LAYERS.index("pure")


def test_layers_relative_imports_resolve() -> None:
    tree = ast.parse("from . import grub\nfrom ..journal import Journal\n")
    got = otad_imports(tree, "otad.agent.bootloader.sim", False)
    assert "otad.agent.bootloader.grub" in got
    assert "otad.agent.journal" in got
