"""The package's house plan holds: no import cycle, and no module imports from a layer above it.

Imports are read with ast from the source (module level and inside functions alike, since a lazy
import is still a dependency), so the test needs no third-party tool and imports nothing.
docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fused_dft"

# Lowest first; a module may import from its own layer or a lower one. The first prefix that
# matches a module's dotted name (without "fused_dft.") gives its layer.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("partials", "runtime")),
    ("definitions", ("family", "options")),
    ("arguments and per-token math", ("arguments", "coefficients", "selection")),
    ("kernels", ("kernels",)),
    ("backends", ("backends",)),
    ("driver and reference", ("driver", "reference")),
    ("shells", ("ops", "parallel")),
    ("public API", ("loss", "logprobs")),
    ("Hugging Face", ("hf", "transformers")),
    ("trainer adapters", ("integrations",)),
    ("tools", ("tools", "__main__")),
]
# the package's face (public names, and lazily the Hugging Face patch) sits in the layer of the
# highest module it imports: the layers above it may `import fused_dft` as a user does
FACE = "__init__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    if name == FACE:
        return max(layer_of(target) for target in package_imports(PACKAGE / "__init__.py"))
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"fused_dft.{name} is in no layer of tests/test_layers.py: add it")


def package_imports(path: Path) -> set[str]:
    """The fused_dft modules `path` imports (names without the "fused_dft." prefix)."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    if name == FACE:
        base = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from . import partials` names a module, not the package it sits in
            targets = [prefix] if node.module else []
            targets += [f"{prefix}.{a.name}" if prefix else a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "fused_dft":
                found.add(FACE)
                continue
            target = target.removeprefix("fused_dft.")
            path = PACKAGE / target.replace(".", "/")
            if target and (path.with_suffix(".py").exists() or (path / "__init__.py").exists()):
                found.add(target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): package_imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_walk_sees_known_edges():
    # the walker itself must work, or the other tests pass vacuously
    edges = graph()
    assert "driver" in edges["ops"]
    assert "backends.base" in edges["parallel"]
    assert "partials" in edges["backends.chunked"]  # `from .. import partials as P`
    assert len(edges) >= 30


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(f"fused_dft.{m}" for m in cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_module_imports_from_a_layer_above_it():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(name):
                wrong.append(
                    f"fused_dft.{name} ({LAYERS[layer_of(name)][0]}) imports fused_dft.{target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert not wrong, "\n".join(wrong)


def test_kernels_folder_holds_kernels_launchers_and_configs_only():
    names = {p.stem for p in (PACKAGE / "kernels").glob("*.py")}
    assert names <= {"__init__", "common", "configs", "fused_fwd", "fused_bwd", "rows"}, names
