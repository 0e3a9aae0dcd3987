"""The package's layers (docs/layout.md): a module imports only its own layer and the layers below it, and no
module imports itself back through others. Imports are read with `ast` (lazy imports inside functions included),
so nothing is executed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "amused_tune"
# bottom to top; a module's layer is its sub-package, the few top-level modules (constants, the recipe schema, the
# optimizer registry) are the core; model/ (bases, adapters, the objective) sits below sampling/ (the sampler draws
# with the bases' encoders), both below memory/ (the estimate traces the model's steps); styledrop/ runs training
# rounds, so it sits above train/; ui (the web page) sits above the commands: it calls their functions, and
# `amused-tune ui` reaches it by module name only
LAYERS = ("core", "model", "sampling", "memory", "data", "share", "train", "styledrop", "toy", "cli", "ui")


def module_name(path: Path) -> str:
    parts = ("amused_tune",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "core"


def imports_of(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The kit's modules `path` (module `name`) imports (`from pkg import sub` counts as importing pkg.sub)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m.startswith("amused_tune") and m != name}


def import_graph(keep_missing: bool = False) -> dict[str, set[str]]:
    """module -> the kit's modules it imports (`keep_missing`: also names that are no module of the package)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): {m for m in imports_of(p, modules) if keep_missing or m in modules} for p in paths}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a higher layer."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{a} ({layer_of(a)}) -> {b} ({layer_of(b)})" for a, targets in graph.items() for b in targets
                  if rank[layer_of(b)] > rank[layer_of(a)])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_imports_only_its_layer_and_below():
    graph = import_graph()
    assert len(graph) > 30 and "amused_tune.cli" in graph and "amused_tune.train.loop" in graph
    assert upward_imports(graph) == []


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_every_import_of_the_kit_names_one_of_its_modules():
    graph = import_graph(keep_missing=True)
    missing = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if b not in graph)
    assert missing == []


def test_the_package_root_holds_only_the_core_few():
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert root == ["common", "optimizers", "recipe", "writes"]


def test_every_folder_of_the_package_has_a_layer():
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert set(folders) == set(LAYERS) - {"core"}


def test_the_model_folder_does_not_reach_the_sampler_the_toy_or_the_commands():
    graph = import_graph()
    low = [m for m in graph if layer_of(m) in ("core", "model")]
    assert "amused_tune.model.bases" in low and "amused_tune.recipe" in low
    assert not {t for m in low for t in graph[m] if layer_of(t) not in ("core", "model")}


@pytest.mark.parametrize("bad", [
    {"amused_tune.model.bases": {"amused_tune.toy"}},
    {"amused_tune.model.adapters": {"amused_tune.sampling.sampler"}},
    {"amused_tune.sampling.sampler": {"amused_tune.memory.estimate"}},
    {"amused_tune.data.cache": {"amused_tune.train.loop"}},
    {"amused_tune.share.hub": {"amused_tune.cli.args"}},
    {"amused_tune.train.outputs": {"amused_tune.cli"}},
])
def test_an_upward_import_is_caught(bad):
    real = import_graph()
    graph = {**real, **{k: real[k] | v for k, v in bad.items()}}
    (added,) = set(upward_imports(graph)) - set(upward_imports(real))
    (module, targets), = bad.items()
    assert added.startswith(f"{module} (") and f"-> {next(iter(targets))} (" in added


def test_a_cycle_inside_one_layer_is_caught():
    graph = import_graph()
    graph["amused_tune.train.identity"] = graph["amused_tune.train.identity"] | {"amused_tune.train.checkpoints"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "amused_tune.train.identity" in cycle


def test_the_import_reader_sees_lazy_and_from_imports(tmp_path):
    modules = {"amused_tune.cli.args", "amused_tune.data", "amused_tune.data.cache", "amused_tune.recipe"}
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from amused_tune.cli.args import parse_recipe\n"
                     "from amused_tune.data import cache\nfrom . import recipe\n")
    got = {m for m in imports_of(probe, modules, name="amused_tune.common") if m in modules}
    assert got == {"amused_tune.cli.args", "amused_tune.data.cache", "amused_tune.recipe"}


def test_docs_layout_has_a_line_for_every_module():
    """docs/layout.md's tree names every module of the package under its folder, and no module that is gone."""
    text = (PACKAGE.parent / "docs" / "layout.md").read_text()
    tree = text.split("## Every module", 1)[1].split("```")[1]
    listed, folder = set(), ""
    for line in tree.splitlines()[2:]:  # after "amused_tune/"
        name = line.split()[0] if line.strip() else ""
        if name.endswith("/"):
            folder = name
        elif name.endswith(".py"):
            listed.add(f"{folder if line.startswith('    ') else ''}{name}")
    modules = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "kit" not in p.parts}
    modules -= {m for m in modules if m.endswith("__init__.py") and not (PACKAGE / m).read_text().count("\ndef ")}
    assert sorted(modules - listed) == [] and sorted(listed - modules) == []


def test_test_modules_import_only_conftest_and_helpers():
    """pytest puts tests/ (not the repository) on sys.path, so `tests.x` imports fail on a clean clone; and a test
    importing another test module runs that module's tests twice. Shared code lives in conftest.py or helpers.py."""
    tests = Path(__file__).resolve().parent
    own = {p.stem for p in tests.glob("*.py")}
    wrong = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                if top == "tests" or (top in own and top not in ("conftest", "helpers")):
                    wrong.append(f"{path.name}: {name}")
    assert wrong == []
