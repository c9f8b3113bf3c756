"""The helpers package is one pipeline: every import points to a module on its left, so there is no cycle.

    config -> download -> data -> models (base -> gpt2 -> smollm2 -> the registry) -> fastpath -> train
    -> evaluate -> nf4 -> lora -> checkpoints -> instruct -> memory -> plumbing -> finetune

Imports inside functions count too: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
ORDER = ["colab", "config", "download", "data", "own_data", "instruct_data", "models", "fastpath", "train",
         "distributed", "evaluate", "nf4", "lora", "checkpoints", "instruct", "memory", "plumbing", "finetune"]
MODELS_ORDER = ["base", "gpt2", "smollm2", "__init__"]


def module_name(path: Path) -> str:
    """helpers/models/gpt2.py -> helpers.models.gpt2; helpers/models/__init__.py -> helpers.models."""
    parts = path.relative_to(HELPERS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def helpers_imports(path: Path) -> set[str]:
    """Every ``helpers`` module that ``path`` imports (absolute or relative, at any depth of the code)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            # "from helpers import config": config is a module too
            found |= {f"{base}.{alias.name}" for alias in node.names
                      if (HELPERS.parent / f"{base}.{alias.name}".replace(".", "/")).with_suffix(".py").exists()}
    return {name for name in found if name == "helpers" or name.startswith("helpers.")}


def position(module: str) -> tuple[int, int]:
    """Where a module sits in the pipeline (stage, place inside helpers.models)."""
    parts = module.split(".")[1:]
    if not parts:
        return (-1, 0)  # the package itself (its __init__ imports nothing)
    stage = ORDER.index(parts[0])
    inner = MODELS_ORDER.index(parts[1] if len(parts) > 1 else "__init__") if parts[0] == "models" else 0
    return (stage, inner)


def graph() -> dict[str, set[str]]:
    files = sorted(HELPERS.glob("*.py")) + sorted((HELPERS / "models").glob("*.py"))
    return {module_name(path): helpers_imports(path) - {module_name(path)} for path in files}


def test_every_module_has_a_place_in_the_pipeline():
    for module in graph():
        position(module)  # ValueError for a module missing from ORDER / MODELS_ORDER


def test_imports_point_one_way():
    backward = [f"{module} imports {target}" for module, targets in graph().items() for target in targets
                if position(target) >= position(module)]
    assert not backward, f"imports against the pipeline order {ORDER}: {backward}"


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in edges.get(module, ()):
            if state.get(target) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(path + [target])}")
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in edges:
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_relative_and_lazy_imports():
    assert {"helpers.config", "helpers.download"} <= helpers_imports(HELPERS / "data.py")
    assert "helpers.config" in helpers_imports(HELPERS / "download.py")  # "from . import config" inside a function
