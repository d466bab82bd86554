"""The private APIs of other libraries that sdzoo uses, all in sdzoo/internals/*_private.py (one module per
library), each listed in its module's ``INTERNALS``: (module, name, what sdzoo uses it for).

An upgrade that removes one fails here, naming the internal, the installed release and what it was for. The
modules are found by glob and read as source (not imported, so a name that is gone still gets this message
rather than an ImportError of sdzoo). ``name`` is an attribute path (``Class.method`` included), or
``function:variable`` for a local variable of a function defined in ``module``."""
import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sdzoo"
INTERNALS_DIR = PACKAGE / "internals"
# The libraries whose private APIs live in sdzoo/internals only.
LIBRARIES = ("torch", "timm", "huggingface_hub", "transformers")


def private_modules():
    return sorted(INTERNALS_DIR.glob("*_private.py"))


def internals_of(path: Path):
    """The literal ``INTERNALS`` list of a *_private.py module, read from its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "INTERNALS" for t in targets) and node.value is not None:
            try:
                entries = ast.literal_eval(node.value)
            except ValueError:
                raise AssertionError(f"{path.name}: INTERNALS must be a literal list of (module, name, what for) "
                                     "tuples, so that it can be read without importing the module") from None
            for entry in entries:
                assert isinstance(entry, tuple) and len(entry) == 3 and all(isinstance(x, str) and x for x in entry), \
                    f"{path.name}: INTERNALS entry {entry!r} is not a (module, name, what for) tuple of strings"
            return entries
    raise AssertionError(f"{path.name} defines no INTERNALS list: (module, name, what for) for each private name "
                         "it uses")


def all_internals():
    return [(path.stem, *entry) for path in private_modules() for entry in internals_of(path)]


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_references(tree: ast.AST):
    """(module path, name or None, line) for every private name of LIBRARIES that the source reaches: imports of a
    private module or name, and private attributes (also through getattr/hasattr/setattr with a constant name) of
    what an import of those libraries binds. Function-local imports included."""
    bound = {}  # local name -> the dotted path it was imported as
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] not in LIBRARIES:
                    continue
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = alias.name if alias.asname else top  # `import a.b` binds a
                if any(is_private(part) for part in alias.name.split(".")):
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] not in LIBRARIES:
                continue
            private_module = any(is_private(part) for part in node.module.split("."))
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                if private_module or is_private(alias.name):
                    found.append((node.module, alias.name, node.lineno))

    def path_of(node):
        if isinstance(node, ast.Name):
            return bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = path_of(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    # torch._C._foo: one finding, the longest private chain, not one per private part
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute) and is_private(node.attr)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and id(node) not in inner:
            base = path_of(node.value)
            if base:
                found.append((base, node.attr, node.lineno))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and is_private(node.args[1].value)):
            base = path_of(node.args[0])
            if base:
                found.append((base, node.args[1].value, node.lineno))
    return found


def resolve(module_name: str, name: str):
    """The object ``name`` names in ``module_name`` (see the module's doc); raises AttributeError or ImportError."""
    module = importlib.import_module(module_name)
    attribute, _, local = name.partition(":")
    obj = module
    for part in attribute.split("."):
        obj = getattr(obj, part)
    if local:
        function = inspect.unwrap(getattr(obj, "__func__", obj))
        if getattr(function, "__module__", None) != module_name:
            raise AttributeError(f"{attribute} is now defined in {getattr(function, '__module__', None)}, "
                                 f"not {module_name}")
        if local not in function.__code__.co_varnames + function.__code__.co_cellvars:
            raise AttributeError(f"{attribute} has no local variable {local!r}")
    return obj


def test_the_internals_modules_are_found():
    stems = [path.stem for path in private_modules()]
    assert {"timm_private", "hub_private", "transformers_private"} <= set(stems), stems


@pytest.mark.parametrize("owner,module,name,what_for", all_internals(),
                         ids=[f"{owner}:{module}.{name}" for owner, module, name, _ in all_internals()])
def test_every_internal_is_still_there(owner, module, name, what_for):
    library = module.split(".")[0]
    try:
        installed = importlib.import_module(library)
    except ImportError:
        pytest.skip(f"{library} is not installed")
    version = getattr(installed, "__version__", "(no version)")
    try:
        resolve(module, name)
        error = None
    except (ImportError, AttributeError) as e:
        error = f"{type(e).__name__}: {e}"
    if error:
        pytest.fail(f"{module}.{name} is gone from {library} {version} ({error}). sdzoo uses it for {what_for}. "
                    f"Find its public replacement (or its new place) and update sdzoo/internals/{owner}.py",
                    pytrace=False)


def test_resolve_fails_for_a_name_that_is_gone():
    with pytest.raises(AttributeError):
        resolve("inspect", "no_such_name")
    with pytest.raises(AttributeError, match="no local variable 'no_such_local'"):
        resolve("inspect", "getmembers:no_such_local")
    resolve("inspect", "getmembers:predicate")


@pytest.mark.parametrize("path", private_modules(), ids=lambda p: p.name)
def test_internals_cover_every_private_name_the_module_uses(path):
    entries = internals_of(path)
    modules = {module for module, _, _ in entries}

    def covered(module, name):
        if name is None:
            return module in modules
        root = name.partition(":")[0].split(".")[0]
        return (module, root) in {(m, n.partition(":")[0].split(".")[0]) for m, n, _ in entries} \
            or any(m == f"{module}.{name}" or m.startswith(f"{module}.{name}.") for m in modules)

    missing = [f"line {line}: {module}{'.' + name if name else ''}"
               for module, name, line in private_references(ast.parse(path.read_text(encoding="utf-8")))
               if not covered(module, name)]
    assert not missing, f"{path.name} uses private names its INTERNALS does not list: {missing}"


@pytest.mark.parametrize("path", private_modules(), ids=lambda p: p.name)
def test_each_internal_is_documented_at_the_top_of_its_module(path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    assert "checked against" in doc, f"{path.name}: its docstring must say which release it was checked against"
    # each entry's last name (and local variable) appears in the docstring as a word of its own
    undocumented = [name for _, name, _ in internals_of(path)
                    if any(not re.search(rf"(?<!\w){re.escape(part)}(?!\w)", doc)
                           for part in name.split(":")[0].split(".")[-1:] + name.split(":")[1:])]
    assert not undocumented, f"{path.name}: its docstring does not say what these are for: {undocumented}"


def test_private_references_finds_every_form():
    source = ("import torch\nimport torch._dynamo\nfrom torch.utils._pytree import tree_map\n"
              "from timm.models import _hub\n"
              "from huggingface_hub.utils import _http\nx = torch.fx._symbolic_trace\ny = getattr(_http, '_GLOBAL')\n"
              "import numpy\nz = numpy._core\nw = torch.__version__\nv = torch._C._foo\n")
    found = {(module, name) for module, name, _ in private_references(ast.parse(source))}
    assert found == {("torch._dynamo", None), ("torch.utils._pytree", "tree_map"), ("timm.models", "_hub"),
                     ("huggingface_hub.utils", "_http"), ("torch.fx", "_symbolic_trace"),
                     ("huggingface_hub.utils._http", "_GLOBAL"), ("torch._C", "_foo")}, found


def test_no_module_outside_internals_reaches_a_private_name():
    findings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if INTERNALS_DIR in path.parents:
            continue
        for module, name, line in sorted(private_references(ast.parse(path.read_text(encoding="utf-8"))),
                                         key=lambda found: found[2]):
            findings.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module}{'.' + name if name else ''}")
    assert not findings, ("private names of " + ", ".join(LIBRARIES) + " outside sdzoo/internals (import them "
                          "from a *_private.py module there, listed in its INTERNALS):\n" + "\n".join(findings))


def test_import_timm_leaves_the_compile_counter_unloaded():
    """sdzoo loads with every `import timm`: torch._dynamo.testing (functorch.compile, networkx), which only
    `sdzoo coverage --compile` uses, is imported when it is used."""
    code = "import sys, timm; print('torch._dynamo.testing' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr
