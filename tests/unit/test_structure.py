"""The package's shape (DESIGN.md): imports only point down, and functions stay short enough to read.

- No import cycle among preftune's modules, counting imports inside functions (a lazy import is still a
  dependency; "lazy to break a cycle" is how the five cycles this test first found had come about).
- Components (config, errors, data, models, losses, train, rl, eval, ...) never import a recipe, the CLI or the
  benchmark (the ``bench`` recipe's own package, which runs other recipes in its children).
- No function over ~60 statements without a comment that says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "preftune"
RECIPE_SIDE = ("preftune.cli", "preftune.recipes", "preftune.benchmark", "preftune.api")
MAX_STATEMENTS = 60
WHY = "# long:"  # a function over the cap says why on the line above its `def`


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The preftune modules ``name`` imports anywhere in its file (``from X import y`` counts as X.y when that is
    a module, else X)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _recipe_side(name: str) -> bool:
    return any(name == side or name.startswith(side + ".") for side in RECIPE_SIDE)


def test_the_import_graph_is_read_correctly():
    # Catches: a walker that sees nothing (the tests below would then pass on any package).
    graph = import_graph()
    assert "preftune.recipes.dpo" in graph["preftune.cli"] or "preftune.recipes" in graph["preftune.cli"]
    assert "preftune.train.loop" in graph["preftune.recipes.dpo"]  # an import inside run()
    assert "preftune.errors" in graph["preftune.config"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_components_never_import_recipes_or_the_cli():
    graph = import_graph()
    wrong = {name: sorted(d for d in deps if _recipe_side(d))
             for name, deps in graph.items() if not _recipe_side(name) and name != "preftune"}
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_every_command_is_a_recipe():
    from preftune.cli import build_parser
    from preftune.recipes import RECIPES

    commands = build_parser()._subparsers._group_actions[0].choices
    assert sorted(commands) == sorted(RECIPES)
    assert {p.stem for p in (PACKAGE / "recipes").glob("*.py")} - {"__init__", "common"} == set(RECIPES)


def _statements(fn: ast.AST) -> int:
    """Statements in a function's body, nested blocks included; a nested def or class counts as one."""
    count = 0
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        count += 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                todo.append(child)
            elif isinstance(child, ast.excepthandler) or type(child).__name__ == "match_case":
                todo.extend(child.body)
    return count


def long_functions() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _statements(node) > MAX_STATEMENTS:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if not lines[first - 2].strip().startswith(WHY):
                    out.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({_statements(node)})")
    return out


def test_statement_counter_by_hand():
    tree = ast.parse("def f(x):\n    if x:\n        a = 1\n        b = 2\n    else:\n        c = 3\n"
                     "    def g():\n        return 1\n    for i in x:\n        pass\n    try:\n        d = 1\n"
                     "    except ValueError:\n        e = 1\n    return x\n")
    # if, a, b, c, def g (its body not counted), for, pass, try, d, e, return
    assert _statements(tree.body[0]) == 11


def test_no_function_over_the_statement_cap_without_a_reason():
    assert long_functions() == []
