"""Names from outside in the outputs: a CSV cell never starts a spreadsheet formula, the table
never sends control sequences to the terminal, JSON lines keep the raw text."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from cxr.runtime.cli import cli
from cxr.runtime.csv_formula import FORMULA_START, guard_cell, unguard_cell
from cxr.runtime.terminal_text import printable
from synthetic import shaded
from tiny_model import build_tiny_model

FORMULA_NAMES = ["=cmd|' /C calc'!A0.png", "+1.png", "-x.png", "@x.png", "=HYPERLINK(\"x\",\"y\").png",
                 "\tTab.png", "\rCR.png", "'quoted.png"]
PLAIN_NAMES = ["normal.png", "a=b.png", "mid\rcr.png", "mid\nlf.png", "comma,\"quote\".png"]
BAD_NAME = "=bad-not-an-image.png"


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    for name in FORMULA_NAMES + PLAIN_NAMES:
        (root / name).parent.mkdir(exist_ok=True)  # the name holds a "/": a folder, then a file
        Image.fromarray(shaded(24, 24, 30)).save(root / name, format="PNG")  # not blank (input check)
    (root / BAD_NAME).write_text("=1+1 not an image")
    return root


def _scan(folder, model, fmt, monkeypatch):
    """Scan the entries by bare name, as ``cd folder && cxr-infer scan -- *`` does."""
    monkeypatch.chdir(folder)
    names = sorted(p.name for p in folder.iterdir())
    r = CliRunner().invoke(cli, ["scan", "--model", str(model), "--format", fmt, "--", *names],
                           catch_exceptions=False)
    assert r.exit_code == 1, r.output  # one file is not an image
    return r.stdout


@pytest.mark.parametrize("text,cell", [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-x", "'-x"), ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"), ("\n=1", "'\n=1"), ("'=1", "''=1"), ("a=1", "a=1"), ("", ""), ("COVID", "COVID"),
])
def test_guard_cell(text, cell):
    assert guard_cell(text) == cell
    assert unguard_cell(guard_cell(text)) == text  # reversible, also for names starting with '


def test_csv_never_starts_a_formula(hostile_folder, tiny_model_path, monkeypatch):
    out = _scan(hostile_folder, tiny_model_path, "csv", monkeypatch)
    rows = list(csv.reader(io.StringIO(out)))
    header, body = rows[0], rows[1:]
    assert len(body) == len(FORMULA_NAMES) + len(PLAIN_NAMES) + 1
    for row in rows:
        for cell in row:
            assert not cell.startswith(FORMULA_START), (cell, row)
    by_path = {unguard_cell(r[0]): dict(zip(header, r)) for r in body}
    assert set(by_path) == set(FORMULA_NAMES + PLAIN_NAMES + [BAD_NAME])  # every name comes back exactly
    for name in FORMULA_NAMES:
        assert by_path[name]["path"] == "'" + name
        assert by_path[name]["status"] == "ok"
    for name in PLAIN_NAMES:
        assert by_path[name]["path"] == name  # ordinary names are untouched
    assert by_path[BAD_NAME]["path"] == "'" + BAD_NAME and by_path[BAD_NAME]["status"] == "error"
    assert float(by_path["normal.png"]["confidence"]) > 0  # numbers stay numbers


def test_jsonl_keeps_the_raw_names(hostile_folder, tiny_model_path, monkeypatch):
    out = _scan(hostile_folder, tiny_model_path, "jsonl", monkeypatch)
    paths = {json.loads(line)["path"] for line in out.splitlines()}
    assert paths == set(FORMULA_NAMES + PLAIN_NAMES + [BAD_NAME])


def test_class_names_from_the_model_are_guarded_too(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path / "m.onnx", classes=("=1+1", "@B", "-C"))
    (tmp_path / "imgs").mkdir()
    Image.fromarray(shaded(24, 24, 12, 8)).save(tmp_path / "imgs" / "dark.png")
    r = CliRunner().invoke(cli, ["scan", str(tmp_path / "imgs"), "--model", str(model), "--format", "csv"])
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[1][1] == "'=1+1"  # the prediction cell
    assert all(not c.startswith(FORMULA_START) for row in rows for c in row)
    r = CliRunner().invoke(cli, ["scan", str(tmp_path / "imgs"), "--model", str(model), "--format", "jsonl"])
    assert json.loads(r.stdout.splitlines()[0])["prediction"] == "=1+1"


def test_table_output_shows_control_characters_as_escapes(tmp_path):
    names = ["red\x1b[31m.png", "back\rspace.png", "gpj\u202e.exe.png", "bell\x07.png"]
    for n in names:
        Image.fromarray(shaded(24, 24, 30)).save(tmp_path / n, format="PNG")
    model = build_tiny_model(tmp_path.parent / f"{tmp_path.name}-m.onnx")
    r = CliRunner().invoke(cli, ["scan", str(tmp_path), "--model", str(model), "--format", "table"])
    assert r.exit_code == 0, r.output
    for raw in ("\x1b", "\r", "\u202e", "\x07"):
        assert raw not in r.stdout
    for shown in ("red\\x1b[31m.png", "back\\x0dspace.png", "gpj\\u202e.exe.png", "bell\\x07.png"):
        assert shown in r.stdout


def test_printable():
    assert printable("plain name.png") == "plain name.png"
    assert printable("Ärztin 胸部.png") == "Ärztin 胸部.png"  # letters of any script stay
    assert printable("a\x00b\x9bc\u2066d") == "a\\x00b\\x9bc\\u2066d"
