"""The package's layout holds: imports point down the layers, and only the Ray backend imports Ray."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rqvae_ray"
# Each top-level part of the package, by layer: a module may import its own layer and the ones below it only.
LAYERS = {
    "errors": 0,
    "core": 1,
    "inputs": 2,
    "outputs": 3,
    "stages": 3,
    "pipeline": 4,
    "ray_backend": 5,
    "runner": 6,
    "cli": 7,
    "api": 7,
    "run": 8,
    "diff": 8,
}


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def _modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]


def test_every_part_of_the_package_has_a_layer():
    assert {_part(p) for p in _modules()} <= set(LAYERS)


def test_imports_point_down():
    upward = []
    for path in _modules():
        here = LAYERS[_part(path)]
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] == "rqvae_ray" and len(parts) > 1 and LAYERS[parts[1]] > here:
                upward.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not upward, upward


def test_only_the_ray_backend_imports_ray():
    importing = sorted(
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if _part(path) != "ray_backend" and any(m.split(".")[0] == "ray" for m in _imports(path))
    )
    assert not importing, importing
