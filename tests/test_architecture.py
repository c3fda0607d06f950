"""The rules of docs/architecture.md that a machine can check: every module on its level and no import
from a lower level up to a higher one, no import cycle inside megalite, no module over 400 lines, no
function over 60 lines, and code that cites only documents inside the repository."""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "megalite"
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
# Functions allowed to be longer than MAX_FUNCTION_LINES while they are being split; an entry that is
# no longer needed fails the test, so the list only shrinks.
LONG_FUNCTIONS: set = set()

# docs/architecture.md's floors, bottom to top.  A module may import its own floor and those below;
# a module's floor is that of the longest name here that it starts with.
LEVELS = [
    ("megalite", "megalite.log", "megalite.extras", "megalite.parallel", "megalite.ops"),
    ("megalite.config",),
    ("megalite.model", "megalite.optim", "megalite.data"),
    ("megalite.checkpoint",),
    ("megalite.training",),
    ("megalite.scaling",),
    ("megalite.calibration",),
    ("megalite.train", "megalite.generate", "megalite.plan"),   # the front doors (console scripts)
]


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def import_graph():
    """module -> the megalite modules it imports (at any depth of its code)."""
    known = dict(modules())
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in known else module)
        graph[name] = sorted(t for t in targets if t in known and t != name)
    return graph


def find_cycle(graph):
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def level_of(module: str, levels=LEVELS):
    """The floor of a module, or None when no floor names it."""
    best = None
    for level, prefixes in enumerate(levels):
        for prefix in prefixes:
            if module == prefix or (prefix != "megalite" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > len(best[1]):
                    best = (level, prefix)
    return None if best is None else best[0]


def upward_imports(graph, levels=LEVELS):
    """'a (floor i) imports b (floor j > i)' for each import from a lower floor to a higher one."""
    return [f"{a} (floor {level_of(a, levels)}) imports {b} (floor {level_of(b, levels)})"
            for a, targets in sorted(graph.items()) for b in targets
            if level_of(b, levels) is not None and level_of(a, levels) is not None
            and level_of(b, levels) > level_of(a, levels)]


def test_levels_find_an_upward_import():
    levels = [("megalite.low",), ("megalite.high",)]
    graph = {"megalite.low.a": ["megalite.high.b"], "megalite.high.b": ["megalite.low.c"], "megalite.low.c": []}
    assert upward_imports(graph, levels) == ["megalite.low.a (floor 0) imports megalite.high.b (floor 1)"]
    assert level_of("megalite.lowest", levels) is None and level_of("megalite.low", levels) == 0


def test_every_module_has_a_floor():
    assert [name for name, _ in modules() if level_of(name) is None] == []


def test_no_import_points_upward():
    graph = import_graph()
    assert "megalite.log" in graph["megalite.checkpoint.reader"]   # the graph sees real edges
    assert upward_imports(graph) == []


def test_find_cycle_finds_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


def test_no_import_cycle_inside_megalite():
    graph = import_graph()
    assert "megalite.optim" in graph["megalite.training.loop"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_module_is_short(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (one idea per file, docs/architecture.md)"


def function_lengths(name: str, tree: ast.AST):
    """(qualified name, first line, lines from ``def`` to the end of the body) of every function and
    method in a module's tree, nested ones too (each also counted as part of its parent)."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualified = f"{prefix}.{child.name}"
                if not isinstance(child, ast.ClassDef):
                    found.append((qualified, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, qualified)
            else:
                visit(child, prefix)

    visit(tree, name)
    return found


def long_functions(lengths, allowed=frozenset(), limit=MAX_FUNCTION_LINES):
    """One message per function over ``limit`` lines that ``allowed`` does not name, and per name in
    ``allowed`` that is not such a function (gone, or short enough now)."""
    problems, long = [], set()
    for qualified, path, line, length in lengths:
        if length > limit:
            long.add(qualified)
            if qualified not in allowed:
                problems.append(f"{qualified} ({path}:{line}) has {length} lines; split it (at most {limit})")
    problems += [f"{qualified} is allowed to be over {limit} lines but is not (or is gone): remove it from "
                 f"LONG_FUNCTIONS" for qualified in sorted(set(allowed) - long)]
    return problems


def test_function_lengths_are_counted():
    source = ("class A:\n    def f(self):\n        def g():\n            pass\n        return g\n\n\n"
              "async def h():\n    pass\n")
    assert function_lengths("m", ast.parse(source)) == [("m.A.f", 2, 4), ("m.A.f.g", 3, 2), ("m.h", 8, 2)]
    lengths = [("m.short", "m.py", 1, 60), ("m.long", "m.py", 70, 61), ("m.allowed", "m.py", 9, 80),
               ("m.done", "m.py", 99, 60)]
    assert long_functions(lengths, {"m.allowed", "m.done"}) == [
        "m.long (m.py:70) has 61 lines; split it (at most 60)",
        "m.done is allowed to be over 60 lines but is not (or is gone): remove it from LONG_FUNCTIONS"]


def test_no_function_is_long():
    lengths = [(qualified, path.relative_to(PACKAGE.parent), line, length) for name, path in modules()
               for qualified, line, length in function_lengths(name, ast.parse(path.read_text()))]
    problems = long_functions(lengths, LONG_FUNCTIONS)
    assert not problems, "\n".join(problems)


def test_code_cites_only_documents_in_the_repository():
    cited = re.compile(r"DESIGN\.md|\bissue #?\d+|STYLE\.md")
    offenders = [f"{path}: {line.strip()}" for _, path in modules()
                 for line in path.read_text().splitlines() if cited.search(line)]
    assert not offenders, offenders
