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


def test_study_scripts_share_a_driver_not_each_other():
    """ablate.py and noise_study.py take their driver from study.py (no `__main__`), neither from the other."""
    scripts = {"ablate", "noise_study"}
    for script in scripts:
        assert "study" in imports(PRODUCT[script]) and not imports(PRODUCT[script]) & (scripts - {script}), script
    assert not any(is_main_block(node) for node in ast.parse(PRODUCT["study"].read_text()).body)


def test_tests_live_in_tests_but_the_math():
    assert sorted(p.name for p in ROOT.glob("test_*.py")) == ["test_loss.py"]
    assert not list(ROOT.glob("conftest.py")) and (ROOT / "tests" / "conftest.py").is_file()


def is_main_block(node):
    """`if __name__ == "__main__":` at a module's top level."""
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def process_exits(tree):
    """(line, class, function) of every `raise SystemExit`, `sys.exit(...)` and `os._exit(...)` in `tree`, with the
    class and function that hold it (None at module level)."""
    found = []

    def ends_process(node):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            return isinstance(target, ast.Name) and target.id == "SystemExit"
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in
                {("sys", "exit"), ("os", "_exit")})

    def visit(node, cls, function):
        for child in ast.iter_child_nodes(node):
            if ends_process(child):
                found.append((child.lineno, cls, function))
            if isinstance(child, ast.ClassDef):
                visit(child, child.name, None)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, cls if function is None else None, child.name)
            else:
                visit(child, cls, function)
    visit(tree, None, None)
    return found


def test_only_commands_end_the_process():
    """One exit point per command (errors.py): a module without an `if __name__ == "__main__":` block raises
    (errors.Refusal, ValueError, OSError) and never ends the process, so a notebook, a test or another script that
    imports it can catch what went wrong. Only an argparse parser's own `error()` method exits, as argparse does
    (config.Parser)."""
    offenders = []
    for name, path in sorted(PRODUCT.items()):
        tree = ast.parse(path.read_text())
        if any(is_main_block(node) for node in tree.body):
            continue
        offenders += [f"{path.name}:{line}" for line, cls, function in process_exits(tree)
                      if not (cls is not None and function == "error")]
    assert not offenders, f"raise errors.Refusal (the command turns it into one line), not SystemExit: {offenders}"


def test_the_exit_check_sees_what_it_must():
    """process_exits finds a raise at any depth and knows a parser's error() from a function named error."""
    tree = ast.parse("import sys\nclass P:\n    def error(self, m):\n        raise SystemExit(m)\n"
                     "def error(m):\n    raise SystemExit\n"
                     "def f():\n    try:\n        pass\n    except ValueError:\n        if True:\n            sys.exit(1)\n")
    assert process_exits(tree) == [(4, "P", "error"), (6, None, "error"), (12, None, "f")]
    assert is_main_block(ast.parse('if __name__ == "__main__":\n    main()\n').body[0])


def test_one_definition_of_each_shared_helper():
    """read_json, Z95 and size_text are defined once (issue 27), in the lowest module that needs them, and
    imported elsewhere: data.read_json, stagnation.Z95, diskspace.size_text."""
    where = {}
    for name, path in sorted(PRODUCT.items()):
        for node in ast.parse(path.read_text()).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
                t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            for found in set(names) & {"read_json", "_read_json", "Z95", "size_text"}:
                where.setdefault(found.lstrip("_"), []).append(name)
    assert where == {"read_json": ["data"], "Z95": ["stagnation"], "size_text": ["diskspace"]}
