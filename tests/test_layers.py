"""The package's layers: each module imports only from its own layer or those below, and nothing imports in a
circle. The layers are declared here, once; the test reads every import of every module (function-local ones
included) from the source."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sdzoo"

# Bottom to top. A module belongs to the first layer whose prefix names it.
LAYERS = [
    ("internals", ["sdzoo.internals"]),
    ("files and weights", ["sdzoo.files"]),
    ("the idea", ["sdzoo.survival", "sdzoo.gate", "sdzoo.gate_compile", "sdzoo.fold", "sdzoo.convert",
                  "sdzoo.prune", "sdzoo.datasets", "sdzoo.models"]),
    ("training", ["sdzoo.training"]),
    ("export and the Hub", ["sdzoo.export", "sdzoo.hub"]),
    ("the command line", ["sdzoo.cli", "sdzoo.__main__"]),
    ("the package's names", ["sdzoo"]),  # sdzoo/__init__.py: the documented top-level names
]
# A function-local import of an sdzoo module is allowed only where it breaks no rule above and the module says
# why; none is needed today.
LOCAL_IMPORTS_ALLOWED = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer of tests/test_layers.py: add it to LAYERS")


def sdzoo_imports(path: Path):
    """(imported module, line, is it inside a function) for every import of an sdzoo module in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local_lines = {n.lineno for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from sdzoo.x import y` imports sdzoo.x.y when y is a module
            paths = {a.name: PACKAGE.parent / f"{base}.{a.name}".replace(".", "/") for a in node.names}
            targets = [f"{base}.{a.name}" if paths[a.name].with_suffix(".py").exists() or paths[a.name].is_dir()
                       else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "sdzoo" or target.startswith("sdzoo."):
                yield target, node.lineno, node.lineno in local_lines


def import_graph():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = (path, list(sdzoo_imports(path)))
    return graph


def upward_imports(graph):
    found = []
    for module, (path, imports) in graph.items():
        for target, line, _ in imports:
            if layer_of(target) > layer_of(module):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) "
                             f"imports {target} ({LAYERS[layer_of(target)][0]})")
    return found


def circles(graph):
    """Every import circle, as a list of modules (a depth-first search over the module graph)."""
    edges = {m: sorted({t for t, _, _ in imports if t in graph and t != m}) for m, (_, imports) in graph.items()}
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [])
    return found


def test_every_module_belongs_to_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = upward_imports(import_graph())
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_circle():
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_function_local_import_of_an_sdzoo_module():
    local = [f"{path.relative_to(PACKAGE.parent)}:{line}: {target}"
             for module, (path, imports) in import_graph().items()
             for target, line, is_local in imports if is_local and (module, target) not in LOCAL_IMPORTS_ALLOWED]
    assert not local, ("function-local imports of sdzoo modules (import at the top, or move the code):\n"
                       + "\n".join(local))


@pytest.mark.parametrize("target, upward", [("sdzoo.training.train", True), ("sdzoo.files.checks", False)])
def test_the_checks_find_an_upward_import(target, upward):
    # A module of the bottom layer that imports training (upward) or its own layer (allowed).
    graph = {"sdzoo.files.probe": (PACKAGE / "files" / "probe.py", [(target, 1, False)])}
    found = upward_imports(graph)
    assert bool(found) == upward
    if upward:
        assert found == ["sdzoo/files/probe.py:1: sdzoo.files.probe (files and weights) imports sdzoo.training.train "
                         "(training)"]


def test_the_checks_find_a_circle():
    graph = {"sdzoo.a": (None, [("sdzoo.b", 1, False)]), "sdzoo.b": (None, [("sdzoo.c", 1, False)]),
             "sdzoo.c": (None, [("sdzoo.a", 1, False)]), "sdzoo.d": (None, [("sdzoo.a", 1, False)])}
    assert circles(graph) == [["sdzoo.a", "sdzoo.b", "sdzoo.c", "sdzoo.a"]]
