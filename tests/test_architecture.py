"""The rules of docs/architecture.md that a machine can check: no import cycle inside megalite,
no module over 400 lines, and code that cites only documents inside the repository."""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "megalite"
MAX_LINES = 400


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


def test_find_cycle_finds_one():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


def test_no_import_cycle_inside_megalite():
    graph = import_graph()
    assert "megalite.optim" in graph["megalite.training"]  # the graph sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_module_is_short(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it (one idea per file, docs/architecture.md)"


def test_code_cites_only_documents_in_the_repository():
    cited = re.compile(r"DESIGN\.md|\bissue #?\d+|STYLE\.md")
    offenders = [f"{path}: {line.strip()}" for _, path in modules()
                 for line in path.read_text().splitlines() if cited.search(line)]
    assert not offenders, offenders
