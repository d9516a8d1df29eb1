"""The training package's import graph, read from the source: no module of `action` imports itself back through
others (a circle such as action.data.training <-> action.data.nifti_training, which a function-local import hid);
lazy imports inside functions count, since they close the same circle at run time."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports anywhere in its source (`from a.b import c` counts as a.b.c when
    that is a module, else as a.b)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                             for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circles_finds_a_two_module_circle_and_ignores_a_chain():
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_module_of_the_training_package_imports_itself_back():
    graph = import_graph("action")
    assert "action.data.nifti_training" in graph["action.data.training"]  # the graph sees lazy and eager imports
    assert circles(graph) == []
