"""The shape of the code base: no import cycles, small files, explained type-ignores, an exact module table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "rmserve": ROOT / "rmserve",
    "rmserve_kernels": ROOT / "kernels" / "rmserve_kernels",
    "rmserve_client": ROOT / "clients" / "rmserve_client",
}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = [p for p in file.relative_to(folder).with_suffix("").parts if p != "__init__"]
            modules[".".join([package, *parts])] = file
    return modules


def _imports(module: str, file: Path, known: set[str]) -> set[str]:
    """Every package module ``module`` imports, at the top or inside a function."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def test_no_import_cycle_even_through_imports_inside_functions():
    modules = _modules()
    graph = {m: _imports(m, f, set(modules)) for m, f in modules.items()}
    # a package's __init__ re-exporting its submodules is not a dependency of those submodules on it
    for module in graph:
        graph[module] -= {p for p in graph[module] if module.startswith(p + ".")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_source_file_over_600_lines(package):
    long = {
        str(f.relative_to(ROOT)): n
        for f in PACKAGES[package].rglob("*.py")
        if (n := len(f.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_every_type_ignore_names_its_code_and_says_why():
    unexplained = [
        f"{file.relative_to(ROOT)}:{number}"
        for folder in PACKAGES.values()
        for file in folder.rglob("*.py")
        for number, line in enumerate(file.read_text().splitlines(), 1)
        if "type: ignore" in line and not re.search(r"# type: ignore\[[\w,-]+\]\s+#\s*\S", line)
    ]
    assert unexplained == []


def test_the_architecture_module_table_names_modules_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Modules") :]
    table = table[: table.index("\n## ", 1)] if "\n## " in table[1:] else table
    named = re.findall(r"`((?:rmserve|kernels|clients)/[\w/.]+)`", table)
    assert len(named) > 40
    missing = [path for path in named if not (ROOT / path).exists()]
    assert missing == []
    # and every module of the packages has its row
    listed = {(ROOT / path).resolve() for path in named}
    unlisted = [
        str(file.relative_to(ROOT))
        for folder in (PACKAGES["rmserve"], PACKAGES["rmserve_kernels"])
        for file in folder.rglob("*.py")
        if file.name not in ("__init__.py", "__main__.py", "_moe_shared.py") and file.resolve() not in listed
    ]
    assert unlisted == []


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
