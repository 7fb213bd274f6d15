"""The layers import one way: fqa → cluster → benchmarks → jobs; a lower layer never
imports a higher one (parsed with ``ast``, so lazy imports inside functions count too)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("fqa", "cluster", "benchmarks", "jobs")  # lowest first


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


def upward_imports(layer: str) -> list[str]:
    higher = set(LAYERS[LAYERS.index(layer) + 1 :])
    return [
        f"{path.relative_to(ROOT)}:{line} imports {package}"
        for path in sorted((ROOT / layer).rglob("*.py"))
        for package, line in sorted(imported_packages(path))
        if package in higher
    ]


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_no_layer_imports_a_higher_one(layer):
    assert (ROOT / layer / "__init__.py").is_file(), f"{layer}/ is not a package"
    assert upward_imports(layer) == []


def test_the_check_sees_lazy_imports(tmp_path):
    """The parser is not blind: an import inside a function is found."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from jobs.train import main\n    import cluster.driver\n")
    assert imported_packages(module) == {("jobs", 2), ("cluster", 3)}
