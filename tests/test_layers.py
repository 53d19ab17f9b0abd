"""The package's architecture, checked: the tree in ttrl_jax/__init__.py is the import order.

Every module imports only from its own subpackage and from the lines of the tree above its
own, never inside a function, and no imports form a cycle; the README's Layout section lists
the same tree; every module is imported by at least one test.
"""

import ast
import re
from pathlib import Path

import ttrl_jax

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ttrl_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def tree_lines(text: str) -> list[str]:
    """The tree's entries (`model/`, `sharding.py`, ...), in order, from an indented block."""
    return re.findall(r"^ {4}((?:\w+/|\w+\.py))\s", text, re.M)


def layer_of(module: str, order: list[str]) -> int:
    """The tree line a module stands on: its subpackage's, or its own (a top-level module)."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the package itself
    for i, entry in enumerate(order):
        if entry == parts[1] + "/" or entry == parts[1] + ".py":
            return i
    raise AssertionError(f"{module} is on no line of the tree in ttrl_jax/__init__.py")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported ttrl_jax module, inside a function?) of each import in the file."""
    tree = ast.parse(path.read_text())
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested |= {id(n) for n in ast.walk(node) if n is not node}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from ttrl_jax.rl import vote` imports the module ttrl_jax.rl.vote.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                for a in node.names
            ]
        out += [(n, id(node) in nested) for n in names if n.split(".")[0] == "ttrl_jax"]
    return out


def test_the_tree_is_the_package():
    order = tree_lines(ttrl_jax.__doc__)
    top = {p.name if p.is_file() else p.name + "/" for p in PACKAGE.iterdir()}
    top = {
        n
        for n in top
        if n != "__init__.py" and (n.endswith(".py") or (PACKAGE / n / "__init__.py").exists())
    }
    assert sorted(order) == sorted(top)
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert tree_lines(layout) == order


def test_imports_follow_the_tree():
    order = tree_lines(ttrl_jax.__doc__)
    wrong = []
    for name, path in MODULES.items():
        mine = layer_of(name, order)
        for target, _ in imports(path):
            theirs = layer_of(target, order)
            same = target.split(".")[:2] == name.split(".")[:2]
            if theirs > mine or (theirs == mine and not same):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the order of the tree:\n" + "\n".join(wrong)


def test_no_imports_inside_functions():
    inside = [f"{n} imports {t}" for n, p in MODULES.items() for t, nested in imports(p) if nested]
    assert not inside


def test_no_import_cycles():
    graph = {n: {t for t, _ in imports(p) if t != n} for n, p in MODULES.items()}
    # A package's __init__ runs before its modules: importing ttrl_jax.rl.vote imports ttrl_jax.rl.
    for n in MODULES:
        parent = n.rsplit(".", 1)[0]
        if parent != n and parent in graph:
            graph[n].add(parent)
    done, path = set(), []

    def visit(n):
        if n in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
        if n in done:
            return
        path.append(n)
        for t in sorted(graph.get(n, ())):
            visit(t)
        path.pop()
        done.add(n)

    for n in sorted(graph):
        visit(n)


def test_every_module_is_imported_by_a_test():
    imported = {t for p in (ROOT / "tests").rglob("*.py") for t, _ in imports(p)}
    untested = [
        n
        for n, p in MODULES.items()
        if p.name not in ("__init__.py", "__main__.py") and n not in imported
    ]
    assert not untested
