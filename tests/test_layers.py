"""The house's rules, checked from the source: imports only run down the layers, no two packages import each
other in a circle, the configuration/planning/report path never imports torch, and no file or package grows
past its share (docs/architecture.md draws the layers)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = ("gpt2", "lib", "bench", "scripts")

# Lowest first. A module may import modules of its own layer and of any layer below it.
LAYERS = (
    ("gpt2.settings", "gpt2.io"),
    ("gpt2.model", "gpt2.data"),
    ("gpt2.train",),
    ("lib.config",),
    ("lib.runs", "lib.export", "lib.evaluate"),
    ("lib.matrix",),
    ("lib.report",),
    ("bench",),
    ("scripts",),
)
MAX_FILE_LINES = 350
MAX_PACKAGE_SHARE = 0.25


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list:
    return sorted(p for root in SOURCE_ROOTS for p in (REPO_ROOT / root).rglob("*.py"))


def imports_of(path: Path) -> set:
    """Absolute names of the project modules a file imports (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in SOURCE_ROOTS}


def layer_of(module: str):
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def package_of(module: str) -> str:
    """The room a module lives in: its first two name parts (gpt2.model, lib.matrix; gpt2.io stays gpt2.io)."""
    return ".".join(module.split(".")[:2])


def test_every_module_has_a_layer():
    homeless = [module_name(p) for p in source_files()
                if layer_of(module_name(p)) is None and module_name(p) not in SOURCE_ROOTS]
    assert homeless == [], f"modules outside every layer (add them to LAYERS and docs/architecture.md): {homeless}"


def test_imports_only_run_down():
    upward = []
    for path in source_files():
        here = layer_of(module_name(path))
        for target in imports_of(path):
            there = layer_of(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{module_name(path)} (layer {here}) imports {target} (layer {there})")
    assert upward == [], "imports that run up a layer:\n" + "\n".join(upward)


def test_no_two_packages_import_each_other():
    edges = {}
    for path in source_files():
        source = package_of(module_name(path))
        for target in imports_of(path):
            if package_of(target) != source and package_of(target) not in SOURCE_ROOTS:
                edges.setdefault(source, set()).add(package_of(target))
    cycles = []

    def visit(node, trail):
        for nxt in sorted(edges.get(node, ())):
            if nxt in trail:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif len(trail) < len(edges) + 1:
                visit(nxt, trail + [nxt])

    for start in sorted(edges):
        visit(start, [start])
    assert cycles == [], "packages that import each other in a circle:\n" + "\n".join(sorted(set(cycles)))


@pytest.mark.parametrize("module", ["lib.config", "lib.config.steps", "lib.config.edit", "lib.config.extras",
                                    "lib.matrix.plan", "lib.matrix.describe", "lib.matrix.state", "lib.matrix.sweep",
                                    "lib.matrix.fingerprint", "lib.report.writer", "lib.report.verdicts",
                                    "lib.report.reproduce", "lib.report.sweep", "gpt2.settings", "gpt2.io"])
def test_configuration_planning_and_reports_never_import_torch(module):
    code = f"import sys, {module}; sys.exit(1 if 'torch' in sys.modules else 0)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"importing {module} imports torch {proc.stderr[-2000:]}"


def test_no_file_or_package_too_large():
    lines = {module_name(p): len(p.read_text().splitlines()) for p in source_files()}
    big_files = {m: n for m, n in lines.items() if n > MAX_FILE_LINES}
    assert big_files == {}, f"source files over {MAX_FILE_LINES} lines: {big_files}"
    total = sum(lines.values())
    by_package = {}
    for module, n in lines.items():
        directory = module if (REPO_ROOT / module.replace(".", "/")).is_dir() else module.rpartition(".")[0]
        by_package[directory] = by_package.get(directory, 0) + n
    crowded = {p: f"{n / total:.0%}" for p, n in by_package.items() if n > MAX_PACKAGE_SHARE * total}
    assert crowded == {}, f"packages holding more than {MAX_PACKAGE_SHARE:.0%} of {total} source lines: {crowded}"
