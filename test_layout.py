"""The layout rules of README "Layout": no import cycle among the project's modules, no product module
importing a test module, and every file at most 400 lines."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def project_imports(path):
    """Names of project modules that `path` imports (at any depth of the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return {m for m in found if m in MODULES}


def is_test(name):
    return name.startswith("test_") or name == "conftest"


def test_no_product_module_imports_a_test_module():
    bad = {m: sorted(filter(is_test, project_imports(p))) for m, p in MODULES.items() if not is_test(m)}
    assert not {m: t for m, t in bad.items() if t}


def test_no_import_cycle():
    graph = {m: project_imports(p) - {m} for m, p in MODULES.items() if not is_test(m)}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph.get(m, ())):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_files_are_at_most_400_lines():
    long = {p.name: n for p in ROOT.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long
