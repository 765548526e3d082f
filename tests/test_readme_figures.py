"""Every measured figure the README quotes comes from a committed results file and appears there verbatim.

Two ways the README ties a figure to its file:
- a marker comment after a paragraph, `<!-- figures PATH: fig; fig; ... -->`: each fig is quoted in the paragraph
  just above it and appears in PATH;
- the "Measured at digits scale" table: each number in a row's figure cell appears (as a whole number) in the file
  its "where" cell names (`row N` means the file named above it).
Timings and ratios in the README's prose (`31.1 s`, `2.8 minutes`, `2.19x`, `79.8 images/s`) must be covered by one
of the two, so a new unsourced figure fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARKER = re.compile(r"<!-- figures (\S+): (.*?) -->", re.S)
NUMBER = re.compile(r"\d+(?:\.\d+)?")
# a measured time, rate or ratio in prose
TIMING = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?: ?(?:s|ms|minutes|min|images/s)\b|x\b)")


# Durations in the prose that are budgets or limits, not measurements (each with why).
NOT_MEASURED = {
    "8 minutes": "the time budget benchmarks/gpu_check.sh is written to fit in, not a result",
    "10 minutes": "the default of --checkpoint-minutes, a setting, not a result",
}


def markers():
    """(path, [figures], text before the marker) for each figures marker."""
    for m in MARKER.finditer(README):
        figs = [f.strip().strip('"') for f in m.group(2).split(";") if f.strip()]
        yield m.group(1), figs, README[max(0, m.start() - 3000) : m.start()]


def measured_table():
    """(what, figure cell, [files]) for each row of the Measured at digits scale table."""
    section = README.split("## Measured at digits scale", 1)[1].split("\n## ", 1)[0]
    current = None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in ("what", "---") or set(cells[0]) <= {"-"}:
            continue
        named = re.findall(r"`([^`]+\.(?:md|json))`", cells[2])
        if named:
            current = named
        yield cells[0], cells[1], current


def has_number(text: str, number: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text) is not None


def test_every_marker_figure_is_in_its_file_and_in_the_paragraph_above():
    found = list(markers())
    assert found, "the README has no figures markers"
    for path, figs, before in found:
        text = (ROOT / path).read_text()
        assert figs, path
        paragraph = before.rsplit("\n\n", 1)[-1]
        for fig in figs:
            assert fig in text, f"{fig!r} is quoted from {path} but is not in it"
            assert fig in paragraph, f"{fig!r} is listed for {path} but the paragraph above does not quote it"


def test_every_number_of_the_measured_table_is_in_the_file_it_names():
    rows = list(measured_table())
    assert len(rows) >= 8
    for what, figure, path in rows:
        assert path, what
        text = "\n".join((ROOT / name).read_text() for name in path)
        for number in NUMBER.findall(figure.replace("+-", " ")):
            assert has_number(text, number), f"{what}: {number} is not in {path}"


def test_no_timing_in_the_prose_is_left_without_a_source():
    covered = set()
    for _, figs, _ in markers():
        covered.update(figs)
    for _, figure, _ in measured_table():
        covered.add(figure)
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    prose = MARKER.sub("", prose)
    prose = re.sub(r"^\|.*\|$", "", prose, flags=re.M)  # tables are checked above
    unsourced = [
        t for t in TIMING.findall(prose) if t not in NOT_MEASURED and not any(t in fig or fig in t for fig in covered)
    ]
    assert unsourced == [], f"figures without a results file: {unsourced}"


def test_the_checker_catches_a_figure_that_is_not_in_its_file(tmp_path):
    results = tmp_path / "r.md"
    results.write_text("search-depth took 31.1 s of CPU\n")
    text = results.read_text()
    assert "31.1 s" in text and "49 s" not in text
    assert has_number("FD 2.17 / 1.40", "1.40") and not has_number("FD 2.17 / 1.405", "1.40")
