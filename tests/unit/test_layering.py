"""Dependencies point one way (docs/architecture.md):

    front-ends (train, demo) -> training / planning / convert -> checkpoint / model / parallel / data
        -> packing -> chat -> files (+ the leaf module reporting)

Every import in the package, at module level or inside a function, is read with ``ast``.
"""

import ast
import os

import pytest

import megatron_pack

PKG_DIR = os.path.dirname(megatron_pack.__file__)

#: rank of each top-level unit of megatron_pack; a unit may import only lower ranks, or its own rank
#: where SAME_RANK_OK allows it (and never in a cycle).
RANK = {
    "files": 0, "reporting": 0, "_packing": 0,
    "chat": 1,
    "packing": 2,
    "data": 3, "model": 3, "parallel": 3, "checkpoint": 3,
    "training": 4, "planning": 4, "convert": 4,
    "experiment": 5,  # runs training (comparisons) and loads checkpoints (leakage)
    "train": 6, "demo": 6,
}
SAME_RANK_OK = {3}  # checkpoint reads model's tensor names; model uses parallel's seeds


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


def test_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    """Negative control: a fake tree where chat imports training and data <-> model."""
    root = tmp_path / "megatron_pack"
    for unit, body in {"chat": "from megatron_pack.training import loop\n",
                       "data": "import megatron_pack.model.builder\n",
                       "model": "def f():\n    from megatron_pack.data import sampling\n"}.items():
        (root / unit).mkdir(parents=True)
        (root / unit / "__init__.py").write_text(body)
    graph = package_imports(str(root))
    assert any(v.startswith("chat (rank 1) imports training") for v in violations(graph))
    assert cycles(graph), "data -> model -> data must be reported"


@pytest.mark.parametrize("module", ["megatron_pack.chat", "megatron_pack.packing", "megatron_pack.files"])
def test_lower_packages_import_without_torch(module):
    """The lower layers are plain Python + numpy: tools that only read data start fast."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
