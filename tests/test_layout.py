"""The layout rules of README "Layout": no import cycle among the project's modules, no product module importing
a test or a benchmark, and the tests in tests/ (but test_loss.py, beside the math it checks)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
PRODUCT = {p.stem: p for p in ROOT.glob("*.py") if not p.stem.startswith("test_")}
TESTS = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"test_loss", "tests"}
BENCH = {"bench"} | {f"bench.{p.stem}" for p in (ROOT / "bench").glob("*.py")}


def imports(path):
    """Top-level names (and bench.X) that `path` imports, at any depth of the file, lazy imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names} | {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module, node.module.split(".")[0]} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_no_product_module_imports_a_test_or_a_benchmark():
    bad = {m: sorted(imports(p) & (TESTS | BENCH)) for m, p in PRODUCT.items()}
    assert not {m: t for m, t in bad.items() if t}


def test_no_import_cycle():
    modules = {**PRODUCT, **{f"bench.{p.stem}": p for p in (ROOT / "bench").glob("*.py")}}
    graph = {m: (imports(p) & set(modules)) - {m} for m, p in modules.items()}
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


def test_tests_live_in_tests_but_the_math():
    assert sorted(p.name for p in ROOT.glob("test_*.py")) == ["test_loss.py"]
    assert not list(ROOT.glob("conftest.py")) and (ROOT / "tests" / "conftest.py").is_file()
