"""The package's layers: every import points down (or sideways within a layer), and nothing imports in
a cycle, neither between modules nor between the packages of `sft_dagster/`.

The graph is read statically (ast) from every module, imports inside functions included: an import
deferred into a function still ties the two modules together, it only hides the tie from Python at
load time. Importing `a.b.c` from outside the package `a.b` also runs `a/b/__init__.py`, so it counts
as an import of `a.b` too. Each module belongs to the most specific entry of `LAYERS` that names it or
a package above it; a new module must be placed in a layer before this test passes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sft_dagster"

# Bottom first. A module may import from its own layer and the layers below it.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["sft_dagster.strict", "sft_dagster.task_types", "sft_dagster.langid", "sft_dagster.atomic",
                    "sft_dagster.storage", "sft_dagster.schema", "sft_dagster.progress", "sft_dagster.instance",
                    "sft_dagster.demo_data", "sft_dagster.retention"]),
    ("metrics", ["sft_dagster.metrics"]),
    ("spec", ["sft_dagster.spec"]),
    ("rows and models", ["sft_dagster.formatting", "sft_dagster.ingest", "sft_dagster.labels", "sft_dagster.splits",
                         "sft_dagster.multitask", "sft_dagster.models", "sft_dagster.tracking", "sft_dagster.console",
                         "sft_dagster.review_cli"]),
    ("torch toolkit and quality gates", ["sft_dagster.torchkit", "sft_dagster.quality"]),
    ("curation, decoding, prompt models", ["sft_dagster.curation", "sft_dagster.decoding", "sft_dagster.prompt_model",
                                           "sft_dagster.artefacts"]),
    ("judge", ["sft_dagster.judge"]),
    ("evaluation and registry", ["sft_dagster.evaluation", "sft_dagster.registry"]),
    ("preference data, losses and PPO", ["sft_dagster.preference", "sft_dagster.rank_cli"]),
    ("training", ["sft_dagster.training"]),
    ("student", ["sft_dagster.student"]),
    ("Dagster definitions", ["sft_dagster.defs"]),
    ("entry points", ["sft_dagster.cli", "sft_dagster.definitions", "sft_dagster"]),
]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str  # file:line


def module_names(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__) for every module under `package_dir`."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: dict) -> list[str]:
    top = module.split(".")[0]
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
    out = []
    for name in names:
        if name.split(".")[0] != top:
            continue
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def import_graph(package_dir: Path) -> tuple[dict[str, tuple[Path, bool]], list[Import]]:
    """Every module and every import between them (explicit, and of the packages an import runs)."""
    modules = module_names(package_dir)
    imports = set()
    for module, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            where = f"{path.relative_to(package_dir.parent)}:{node.lineno}"
            for target in _targets(module, is_package, node, modules):
                chain = target.split(".")
                for i in range(2, len(chain) + 1):  # importing a.b.c runs a/b/__init__.py (not the root's)
                    name = ".".join(chain[:i])
                    inside = module == name or module.startswith(name + ".")  # a package's own modules
                    if name in modules and name != module and (name == target or not inside):
                        imports.add(Import(module, name, where))
    return modules, sorted(imports, key=lambda i: (i.where, i.imported))


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = index, prefix.count(".")
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward_imports(imports: list[Import], layers=LAYERS) -> list[str]:
    names = [name for name, _ in layers]
    return [f"{i.where}: {i.importer} ({names[layer_of(i.importer, layers)]}) imports {i.imported} "
            f"({names[layer_of(i.imported, layers)]}), a layer above it"
            for i in imports if layer_of(i.imported, layers) > layer_of(i.importer, layers)]


def package_of(module: str) -> str:
    """The subpackage (or top-level module) of `sft_dagster` a module belongs to."""
    return ".".join(module.split(".")[:2])


def problems(package_dir: Path, layers=LAYERS) -> list[str]:
    modules, imports = import_graph(package_dir)
    found = [f"{m} is in no layer of LAYERS" for m in modules if layer_of(m, layers) is None]
    if found:
        return found
    found += upward_imports(imports, layers)
    module_edges, package_edges = {}, {}
    for i in imports:
        module_edges.setdefault(i.importer, set()).add(i.imported)
        a, b = package_of(i.importer), package_of(i.imported)
        if a != b and i.importer != package_dir.name and i.imported != package_dir.name:
            package_edges.setdefault(a, set()).add(b)
    found += [f"import cycle between modules: {' <-> '.join(c)}" for c in cycles(module_edges)]
    found += [f"import cycle between packages: {' <-> '.join(c)}" for c in cycles(package_edges)]
    return found


def lazy_indirection(package_dir: Path) -> list[str]:
    """Imports hidden from the graph: `importlib.import_module` / `__import__` calls, and module-level
    `__getattr__` (a `_LAZY` table) anywhere but the root package's, which keeps Dagster out of the
    training worker (`sft_dagster.SFTPipeline`)."""
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(package_dir.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name in ("importlib.import_module", "import_module", "__import__"):
                    found.append(f"{where}:{node.lineno}: {name}")
        if path != package_dir / "__init__.py":
            found += [f"{where}:{n.lineno}: module-level __getattr__" for n in tree.body
                      if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    return found


def test_imports_point_down_and_nothing_imports_in_a_cycle():
    assert problems(PACKAGE) == []


def test_no_import_is_hidden_behind_a_lazy_lookup():
    assert lazy_indirection(PACKAGE) == []


def test_every_layer_entry_names_a_module_or_package():
    modules = module_names(PACKAGE)
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert prefix in modules, prefix


# -- the checker itself fails where it must -------------------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


TOY_LAYERS = [("low", ["pkg.low", "pkg.sub.base"]), ("high", ["pkg.high", "pkg.sub", "pkg"])]


def test_an_upward_import_inside_a_function_fails(tmp_path):
    root = _package(tmp_path, {"low.py": "def f():\n    from .high import g\n", "high.py": "def g():\n    pass\n"})
    assert problems(root, TOY_LAYERS) == [
        "pkg/low.py:2: pkg.low (low) imports pkg.high (high), a layer above it",
    ]


def test_a_cycle_within_one_layer_fails(tmp_path):
    root = _package(tmp_path, {"low.py": "", "high.py": "from . import sub\n",
                               "sub/__init__.py": "", "sub/a.py": "from .b import x\n",
                               "sub/b.py": "x = 1\n\n\ndef late():\n    from .a import y\n"})
    assert problems(root, TOY_LAYERS) == ["import cycle between modules: pkg.sub.a <-> pkg.sub.b"]


def test_a_cycle_between_packages_fails_though_the_modules_form_none(tmp_path):
    root = _package(tmp_path, {"low.py": "", "high.py": "from .sub import a\n", "sub/__init__.py": "",
                               "sub/base.py": "from ..high import h\n", "sub/a.py": "a = 1\n"})
    layers = [("all", ["pkg"])]
    assert problems(root, layers) == ["import cycle between packages: pkg.high <-> pkg.sub"]


def test_importing_a_submodule_runs_its_package(tmp_path):
    """`from pkg.sub.base import x` runs pkg/sub/__init__.py: an import of the (higher) package `pkg.sub`."""
    root = _package(tmp_path, {"low.py": "from .sub.base import x\n", "high.py": "", "sub/__init__.py": "",
                               "sub/base.py": "x = 1\n"})
    assert problems(root, TOY_LAYERS) == ["pkg/low.py:1: pkg.low (low) imports pkg.sub (high), a layer above it"]


def test_a_module_in_no_layer_fails(tmp_path):
    root = _package(tmp_path, {"low.py": "", "high.py": "", "new.py": ""})
    assert problems(root, [("low", ["pkg.low"]), ("high", ["pkg.high"])]) == [
        "pkg is in no layer of LAYERS", "pkg.new is in no layer of LAYERS"]


@pytest.mark.parametrize("text", ["import importlib\nm = importlib.import_module('.x', __name__)\n",
                                  "def __getattr__(name):\n    return name\n"])
def test_a_lazy_import_fails(tmp_path, text):
    root = _package(tmp_path, {"sub/__init__.py": text})
    assert len(lazy_indirection(root)) == 1
