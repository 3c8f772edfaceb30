"""The README stays a true front door: its equation table names functions that carry the equation's tag, its
links lead to files that exist, its commands name files that exist, and it stays short."""
import importlib
import inspect
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
README = (ROOT / "README.md").read_text()
ROW = re.compile(r"^\| (Eq\. [0-9–]+|App\. H) \| .* \| `(\w+)\.([\w.]+)` \|$")


def tags_of(tag):
    """'Eq. 5–6' -> ['Eq. 5', 'Eq. 6'] unless the range itself is written in the code (checked by the caller)."""
    m = re.fullmatch(r"Eq\. (\d+)–(\d+)", tag)
    return [f"Eq. {i}" for i in range(int(m[1]), int(m[2]) + 1)] if m else [tag]


def test_equation_table_names_functions_that_carry_their_tag():
    rows = [m.groups() for line in README.splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 12, "the README's equation table was not found"
    for tag, module, name in rows:
        source = inspect.getsource(getattr(importlib.import_module(module), name))
        assert f"# {tag}" in source or all(f"# {t}" in source for t in tags_of(tag)), (module, name, tag)


def test_links_and_files_named_by_the_readme_exist():
    links = re.findall(r"\]\(((?:docs|figures)/[^)#]+)\)", README)
    assert {"docs/noise.md", "docs/study.md", "docs/pipeline.md"} <= set(links)
    for link in links:
        assert (ROOT / link).is_file(), link
    for doc in (ROOT / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / link).exists(), (doc.name, link)
    for name in re.findall(r"-r (requirements[\w-]*\.txt)", README):
        assert (ROOT / name).is_file(), name


def test_readme_is_a_front_door():
    assert len(README.splitlines()) <= 300
    assert "python -m pytest -q" in README


def test_the_main_job_command_parses():
    """Every train.py / eval.py call of the README's main job is accepted by that script's own parser (flags and
    values), and they are iterations 0 and 1 of one run directory, scored by eval.py."""
    import shlex

    import config
    import eval as ev
    line = next(x for x in README.splitlines() if x.startswith("python train.py --iter 0 &&"))
    calls = [shlex.split(c) for c in line.split("&&")]
    assert [c[:2] for c in calls] == [["python", "train.py"], ["python", "train.py"], ["python", "eval.py"]]
    runs = [config.parse_args(c[2:]) for c in calls[:2]]
    assert [a.iter for a in runs] == [0, 1] and runs[0].run_dir == runs[1].run_dir
    scored = ev.parse_args(calls[2][2:])
    assert scored.command == "score" and scored.target == runs[0].run_dir
