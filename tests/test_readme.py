"""The README's equation → code table cites lines that really implement what it says."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
ROW = re.compile(r"^\| (Eq\. [0-9–]+|App\. H) \| .* \| `([\w.]+)`, (\w+\.py):(\d+) \|$")


def test_equation_table_lines_carry_their_tag():
    """Every row's file:line holds a comment naming the row's equation, inside the named function."""
    rows = [m.groups() for line in (ROOT / "README.md").read_text().splitlines() if (m := ROW.match(line))]
    assert len(rows) >= 15, "the README's equation table was not found"
    for tag, function, path, lineno in rows:
        lines = (ROOT / path).read_text().splitlines()
        line = lines[int(lineno) - 1]
        assert f"# {tag}" in line or f"# {tag}," in line or f"# {tag}:" in line, (path, lineno, tag, line)
        name = function.split(".")[-1]
        header = next(l for l in reversed(lines[:int(lineno)]) if re.match(r"\s*(def|class) ", l))
        assert re.match(rf"\s*(def|class) {re.escape(name)}\b", header), (path, lineno, function, header)
