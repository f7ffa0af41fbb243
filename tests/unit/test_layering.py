"""Dependencies point one way (docs/architecture.md):

    front-ends (train, demo) -> experiment -> training / planning / convert -> config (the run spec)
        -> checkpoint / model / parallel / data
        -> packing -> preprocess -> templates -> tokenization
        -> files (+ the leaf modules reporting, frontdoor, quiet, mcore_version)

and no two files import each other, directly or round a longer circle, inside a package or across
packages. Every import in the package, at module level or inside a function, is read with ``ast``.
"""

import ast
import os

import pytest

import megatron_pack

PKG_DIR = os.path.dirname(megatron_pack.__file__)

#: rank of each top-level unit of megatron_pack; a unit may import only lower ranks, or its own rank
#: where SAME_RANK_OK allows it (and never in a cycle).
RANK = {
    "files": 0, "reporting": 0, "run_log": 0, "_packing": 0, "frontdoor": 0, "quiet": 0, "mcore_version": 0,
    "tokenization": 1,  # text -> ids with offsets
    "templates": 2,     # messages -> rendered parts and assistant spans
    "preprocess": 3,    # JSONL records -> the indexed SFT dataset
    "packing": 4,
    "data": 5, "model": 5, "parallel": 5, "checkpoint": 5,
    "config": 6,      # the run spec: sections, parsed values, the generated CLIs
    "training": 7, "planning": 7, "convert": 7,
    "experiment": 8,  # runs training (comparisons) and loads checkpoints (leakage)
    "train": 9, "demo": 9,
}
SAME_RANK_OK = {5}  # checkpoint reads model's tensor names; model uses parallel's seeds


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "megatron_pack" or len(parts) < 2:
        return None
    return parts[1]


def package_imports(root: str = PKG_DIR) -> dict:
    """``{unit: {imported unit: [file:line, ...]}}`` for every import inside megatron_pack."""
    graph: dict = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, os.path.dirname(root))
            module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
            src_unit = _unit(module)
            if src_unit is None:
                continue
            for node in ast.walk(ast.parse(open(path).read(), path)):
                targets = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for t in targets:
                    dst = _unit(t)
                    if dst and dst != src_unit and dst in RANK:
                        graph.setdefault(src_unit, {}).setdefault(dst, []).append(f"{rel}:{node.lineno}")
    return graph


def violations(graph: dict) -> list:
    out = []
    for src, dsts in graph.items():
        for dst, where in dsts.items():
            if src not in RANK:
                out.append(f"{src}: not in the layering table ({where[0]})")
            elif RANK[dst] > RANK[src] or (RANK[dst] == RANK[src] and RANK[src] not in SAME_RANK_OK):
                out.append(f"{src} (rank {RANK[src]}) imports {dst} (rank {RANK[dst]}) at {where[0]}")
    return out


def cycles(graph: dict) -> list:
    found, state = [], {}

    def visit(n, stack):
        state[n] = 1
        for m in graph.get(n, {}):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif not state.get(m):
                visit(m, stack + [m])
        state[n] = 2

    for n in list(graph):
        if not state.get(n):
            visit(n, [n])
    return found


def _module_name(path: str, root: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(root))
    return rel[:-3].replace(os.sep, ".").removesuffix(".__init__")


def file_imports(root: str = PKG_DIR) -> dict:
    """``{module: {imported module: first line}}`` between the files of megatron_pack, every import
    (module level or inside a function, absolute or relative). ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at ``pkg`` itself."""
    modules = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                modules[_module_name(path, root)] = path
    graph: dict = {}
    for module, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:  # import a.b.c of a name inside a.b
                    t = t.rpartition(".")[0]
                if t and t != module:
                    edges.setdefault(t, node.lineno)
    return graph


def test_every_unit_is_ranked():
    units = {n[:-3] if n.endswith(".py") else n for n in os.listdir(PKG_DIR)
             if not n.startswith(("__", ".")) and (n.endswith(".py") or os.path.isdir(os.path.join(PKG_DIR, n)))
             and n not in ("assets",)}
    units = {u for u in units if not u.startswith("_packing")}
    assert units - set(RANK) == set(), "new top-level module or package: give it a rank in RANK"


def test_dependencies_point_down_and_never_cycle():
    graph = package_imports()
    assert violations(graph) == []
    assert cycles(graph) == []


def test_no_file_imports_itself_round_a_circle():
    """No circle between files: where two files need each other, the shared piece belongs in one
    of them or in a small module both use. Function-level imports count (they only hide it)."""
    assert cycles(file_imports()) == []


def test_file_cycle_checker_catches_a_hidden_two_file_circle(tmp_path):
    """Negative control: templates/a.py imports b at module level, b imports a inside a
    function (the shape chat/ had three times), c imports a one way."""
    pkg = tmp_path / "megatron_pack" / "templates"
    pkg.mkdir(parents=True)
    (pkg.parent / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from megatron_pack.templates.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import megatron_pack.templates.a\n")
    graph = file_imports(str(tmp_path / "megatron_pack"))
    assert graph["megatron_pack.templates.c"] == {"megatron_pack.templates.a": 1}
    found = cycles(graph)
    assert found and {"megatron_pack.templates.a", "megatron_pack.templates.b"} <= set(found[0])
    assert not any("megatron_pack.templates.c" in c for c in found)
    (pkg / "b.py").write_text("def f():\n    return 1\n")  # the circle broken: nothing reported
    assert cycles(file_imports(str(tmp_path / "megatron_pack"))) == []


def test_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    """Negative control: a fake tree where tokenization imports training and data <-> model."""
    root = tmp_path / "megatron_pack"
    for unit, body in {"tokenization": "from megatron_pack.training import loop\n",
                       "data": "import megatron_pack.model.builder\n",
                       "model": "def f():\n    from megatron_pack.data import sampling\n"}.items():
        (root / unit).mkdir(parents=True)
        (root / unit / "__init__.py").write_text(body)
    graph = package_imports(str(root))
    assert any(v.startswith("tokenization (rank 1) imports training") for v in violations(graph))
    assert cycles(graph), "data -> model -> data must be reported"


@pytest.mark.parametrize("module", ["megatron_pack.tokenization.tokenizer", "megatron_pack.templates.registry",
                                    "megatron_pack.templates.jinja_template", "megatron_pack.preprocess.pipeline",
                                    "megatron_pack.packing", "megatron_pack.files"])
def test_lower_packages_import_without_torch(module):
    """The lower layers are plain Python + numpy: tools that only read data start fast."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
