"""The import graph of aml: no circle, and no import from a lower layer into a higher one (docs/DESIGN.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

# The one layer table; the drawing at the top of docs/DESIGN.md mirrors it, file by file (test_design_draws_the_layers).
# An entry names one module (a package's entry names its __init__.py); `pkg.*` names the package and every module in
# it. An exact entry wins over a wildcard, a longer wildcard over a shorter one; a new file matched by neither fails
# test_every_module_is_placed until it is placed here and in the drawing.
LAYERS: dict[str, tuple[str, ...]] = {
    "bottom": (
        "aml",  # the package itself: finds teachers/ and students/ in a source checkout
        "aml.errors",
        "aml.io",
        "aml.trust",
        "aml.settings",
        "aml.threads",
        "aml.progress",
        "aml.allocator",
        "aml.lock",
        "aml.ort_session",
        "aml.nn",
        "aml.glam",
        "aml.net",
        "aml.probe",
        "aml.whiten",
        "aml.registry",
        "aml.identity",
        "aml.sidecar",
        "aml.binary",
        "aml.data.*",
        "aml.teachers.*",
        "aml.students.*",
    ),
    "middle": (
        "aml.extract",
        "aml.ort_backend",
        "aml.onnx_embed",
        "aml.pte_embed",
        "aml.exported",
        "aml.teacher_vectors",
        "aml.cache",
        "aml.closed_form",
        "aml.mining",
        "aml.scoring",
        "aml.faiss_gpu",
        "aml.search",
        "aml.index",
        "aml.show",
        "aml.compat",
        "aml.losses.*",
        "aml.export",  # the package's __init__.py, run by every import of an export module
        "aml.export.encoder",  # the four that ort_backend loads: bottom-layer code only
        "aml.export.friendly",
        "aml.export.onnx_export",
        "aml.export.torchscript_export",
    ),
    "top": (
        "aml.evaluate",
        "aml.milvus",
        "aml.train.*",
        "aml.export.pipeline",
        "aml.export.formats",
        "aml.export.mobile",
        "aml.export.executorch_format",
        "aml.export.coreml_format",
        "aml.export.ort_format",
        "aml.export.verify",
        "aml.export.quantize",
        "aml.export.quant_report",
        "aml.serve.*",
    ),
    "CLI": (
        "aml.cli",
        "aml.commands.*",
    ),
}
ORDER = list(LAYERS)  # bottom first

# Imports allowed to point up, each with its reason. None today: keep it that way, or name the import and say why.
EXCEPTIONS: dict[tuple[str, str], str] = {}

# Where each module's source is: aml/ and the backbone families, which install as aml.teachers / aml.students.
ROOTS = {"aml": REPO / "aml", "aml.teachers": REPO / "teachers", "aml.students": REPO / "students"}


def module_files() -> dict[str, Path]:
    """Every aml module name -> its file (a package is its __init__.py)."""
    out = {}
    for prefix, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((prefix, *parts))] = path
    return out


MODULES = module_files()


def is_type_checking(node: ast.AST) -> bool:
    """Whether node is `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports for annotations only."""
    return isinstance(node, ast.If) and re.fullmatch(r"(typing\.)?TYPE_CHECKING", ast.unparse(node.test)) is not None


def imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """(name, line) of every import in the file at any depth (deferred ones too), outside `if TYPE_CHECKING:`."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if is_type_checking(child):
                for other in child.orelse:
                    visit_node(other)
            else:
                visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)  # a submodule, if one
        else:
            visit(node)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {aml module it imports: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for name, line in imported_names(module, path):
            if name in MODULES and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def layer_of(module: str) -> str | None:
    """The module's layer: its exact entry, else the longest `pkg.*` entry over it, else None."""
    best, where = "", None
    for layer, names in LAYERS.items():
        for name in names:
            if name == module:
                return layer
            pkg = name.removesuffix(".*")
            if name.endswith(".*") and (module == pkg or module.startswith(pkg + ".")) and len(pkg) > len(best):
                best, where = pkg, layer
    return where


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


GRAPH = import_graph()


def test_every_module_is_placed():
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced, f"place these modules in tests/test_layers.py LAYERS and docs/DESIGN.md: {unplaced}"


def test_table_names_real_modules():
    stale = [n for names in LAYERS.values() for n in names if n.removesuffix(".*") not in MODULES]
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_no_import_circle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def upward_imports(graph: dict[str, dict[str, int]]) -> list[tuple[str, str, str]]:
    """(importer, imported, 'file:line ...') of every import into a higher layer, the implicit one of a submodule's
    package included (importing a.b.c runs a/b/__init__.py)."""
    found = []
    for module, edges in graph.items():
        targets = dict(edges)
        for name in list(edges):
            parts = name.split(".")
            for n in range(1, len(parts)):
                targets.setdefault(".".join(parts[:n]), edges[name])
        for name, line in sorted(targets.items()):
            if name == module or module.startswith(name + ".") or None in (layer_of(name), layer_of(module)):
                continue  # its own package runs first anyway; an unplaced module fails test_every_module_is_placed
            if ORDER.index(layer_of(name)) > ORDER.index(layer_of(module)) and (module, name) not in EXCEPTIONS:
                where = f"{MODULES[module].relative_to(REPO)}:{line}"
                found.append(
                    (module, name, f"{where}: {module} ({layer_of(module)}) imports {name} ({layer_of(name)})")
                )
    return found


def test_no_import_up_a_layer():
    found = upward_imports(GRAPH)
    assert not found, "imports up a layer:\n" + "\n".join(line for *_, line in found)


def test_exceptions_are_still_needed():
    for importer, imported in EXCEPTIONS:
        assert imported in GRAPH.get(importer, {}), f"stale exception {importer} -> {imported}: remove it"


def drawing(text: str) -> list[tuple[str, str]]:
    """(layer, module) of each file the layer drawing of DESIGN.md places: the first fenced block, lines
    `[LAYER] FOLDER/: stem stem ...` (a line without a layer continues the one above; other lines are prose)."""
    block = re.search(r"^```text\n(.*?)^```", text, flags=re.S | re.M)
    assert block, "docs/DESIGN.md: no ```text layer drawing"
    placed, layer = [], None
    for line in block.group(1).splitlines():
        m = re.match(r"(\S+)?\s+([\w/]+)/:\s+(.*)", line)
        if not m:
            continue
        layer = m.group(1) or layer
        package = {"teachers": "aml.teachers", "students": "aml.students"}.get(m.group(2), m.group(2).replace("/", "."))
        for stem in m.group(3).split():
            placed.append((layer, package if stem == "__init__" else f"{package}.{stem}"))
    return placed


def test_design_draws_the_layers():
    placed = drawing((REPO / "docs" / "DESIGN.md").read_text())
    names = [m for _, m in placed]
    missing = [m for m in MODULES if m not in names]
    assert not missing, f"docs/DESIGN.md's drawing misses {missing}"
    stale = [m for m in names if m not in MODULES]
    assert not stale, f"docs/DESIGN.md's drawing names files that do not exist: {stale}"
    twice = sorted({m for m in names if names.count(m) > 1})
    assert not twice, f"docs/DESIGN.md's drawing places these twice: {twice}"
    wrong = [
        f"{m}: drawn {layer}, tests/test_layers.py says {layer_of(m)}" for layer, m in placed if layer != layer_of(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_drawing_parser():
    text = (
        "x\n```text\nCLI     aml/: cli\n        aml/commands/: __init__ index\n  prose\nbottom  teachers/: vgg\n```\n"
    )
    assert drawing(text) == [
        ("CLI", "aml.cli"),
        ("CLI", "aml.commands"),
        ("CLI", "aml.commands.index"),
        ("bottom", "aml.teachers.vgg"),
    ]


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, ["a", "b", "c", "a"]),
        ({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 2}}, None),
    ],
)
def test_find_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def test_parser_sees_deferred_and_skips_type_checking(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "from typing import TYPE_CHECKING\nfrom . import sib\nif TYPE_CHECKING:\n    import aml.x\n"
        "else:\n    import aml.y\ndef f():\n    from aml.z import w\n"
    )
    names = {name for name, _ in imported_names("aml.pkg.m", path)}
    assert {"aml.pkg", "aml.pkg.sib", "aml.y", "aml.z", "aml.z.w"} <= names
    assert "aml.x" not in names


def test_layer_of_takes_the_longest_entry():
    assert layer_of("aml.export.encoder") == "middle"
    assert layer_of("aml.export.pipeline") == "top"
    assert layer_of("aml.data.spec") == "bottom"
    assert layer_of("aml.commands.index") == "CLI"
    assert layer_of("aml.export") == "middle"
    assert layer_of("aml.nothing") is None
