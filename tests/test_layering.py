"""The import layering of refax, read mechanically from the source (see docs/design.md).

* No function body imports a refax module, except the entries of ``FUNCTION_IMPORTS`` (each
  with its reason): an import inside a function is how a cycle between layers hides.
* Module-level imports go down the layers of ``LAYERS`` (or stay within a layer), and the
  module import graph has no cycle.
* ``ObjectState``'s key in an object's ``__dict__`` is spelled once, in ``refax._object``.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "refax"

# Bottom up. A module belongs to the layer of the longest prefix naming it ("refax" names only
# the package's __init__). A module may import its own layer and the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "bottom",
        (
            "refax.typing",
            "refax.errors",
            "refax._filters",
            "refax._config",
            "refax._tracers",
            "refax._ids",
            "refax._traversals",
            "refax._refs",
            "refax._sharding",
        ),
    ),
    ("variables", ("refax._variables", "refax._kinds", "refax._statelib")),
    ("objects", ("refax._object",)),
    ("graph", ("refax._graph",)),
    (
        "modules",
        (
            "refax._module",
            "refax._containers",
            "refax._rngs",
            "refax._view",
            "refax._with_vars",
            "refax._capture",
            "refax._display",
        ),
    ),
    ("transforms", ("refax._transforms",)),
    ("spmd", ("refax.spmd",)),
    ("nn", ("refax.nn",)),
    ("training", ("refax.training", "refax.torch_weights")),
    ("api", ("refax", "refax.nnx")),
]

# (module, function qualname) -> why the import there is lazy.
FUNCTION_IMPORTS: dict[tuple[str, str], str] = {
    ("refax.nn.linear", "__getattr__"): (
        "module __getattr__: `linear.canonicalize_padding` is the reference's path to a conv "
        "helper; resolved on use so linear does not depend on conv"
    ),
}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The refax modules ``node`` (in ``module``) imports: ``from pkg import sub`` names the
    submodule ``pkg.sub``; a name that is no module names its module."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package.pop()
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [n for n in names if n == "refax" or n.startswith("refax.")]


def _function_imports(module: str) -> list[tuple[str, int, str]]:
    """``(function qualname, line, imported module)`` for the refax imports in function bodies."""
    found = []

    def visit(node: ast.AST, scope: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, [*scope, child.name], True)
            elif isinstance(child, ast.ClassDef):
                visit(child, [*scope, child.name], in_function)
            elif isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function:
                    found.extend(
                        (".".join(scope), child.lineno, m) for m in _imported(module, child)
                    )
            else:
                visit(child, scope, in_function)

    visit(TREES[module], [], False)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_imports(module: str) -> set[str]:
    """The refax modules ``module`` imports when it is imported (not under TYPE_CHECKING),
    leaving out its own parent packages (imported first by Python anyway)."""
    deps: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_imported(module, node))
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(TREES[module].body)
    return {d for d in deps if d in MODULES and not module.startswith(d + ".")}


def _layer(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "refax" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best[0]


def test_no_function_level_imports_of_refax():
    unexpected = []
    used = set()
    for module in MODULES:
        for function, line, imported in _function_imports(module):
            if (module, function) in FUNCTION_IMPORTS:
                used.add((module, function))
            else:
                unexpected.append(f"{MODULES[module]}:{line} {function} imports {imported}")
    assert not unexpected, (
        "Function-level imports of refax modules (they hide import cycles): move them to "
        "module level, fixing the layering if that makes a cycle:\n  " + "\n  ".join(unexpected)
    )
    stale = sorted(set(FUNCTION_IMPORTS) - used)
    assert not stale, f"Remove these entries from FUNCTION_IMPORTS (no import left): {stale}"


def test_module_imports_go_down_the_layers():
    upward = []
    for module in MODULES:
        own = _layer(module)
        for dep in sorted(_module_imports(module)):
            if _layer(dep) > own:
                upward.append(
                    f"{module} ({LAYERS[own][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})"
                )
    assert not upward, "Imports going up the layers:\n  " + "\n  ".join(upward)


def test_module_import_graph_has_no_cycle():
    graph = {module: _module_imports(module) for module in MODULES}
    done: set[str] = set()
    for start in graph:
        if start in done:
            continue
        # iterative depth-first search; a dependency on the current path is a cycle
        path, on_path = [start], {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            for dep in stack[-1]:
                assert dep not in on_path, "Import cycle: " + " -> ".join(
                    [*path[path.index(dep) :], dep]
                )
                if dep not in done:
                    path.append(dep)
                    on_path.add(dep)
                    stack.append(iter(sorted(graph[dep])))
                    break
            else:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())


def test_object_state_key_is_defined_once():
    found = []
    for module, tree in TREES.items():
        if module == "refax._object":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value == "_pytree__state":
                found.append(f"{MODULES[module]}:{node.lineno}")
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "_STATE_ATTR" for t in node.targets
            ):
                found.append(f"{MODULES[module]}:{node.lineno}")
    assert not found, f"import _STATE_ATTR from refax._object instead: {found}"


def test_the_checks_see_imports():
    # the parser finds what the checks rely on (guards against a check that passes vacuously)
    assert ("__getattr__", "refax.nn.conv") in {
        (f, m) for f, _, m in _function_imports("refax.nn.linear")
    }
    assert "refax._graph._graphdef" in _module_imports("refax._graph._api")
    assert "refax._graph._cache" in _module_imports("refax._graph._api")  # `from pkg import sub`
    assert "refax._sharding" in _module_imports("refax._variables")
    assert _layer("refax._graph._api") == _layer("refax._graph") < _layer("refax._module")
