"""Files named after inputs stay inside the output folder, whatever the input path holds."""

from __future__ import annotations

import os
import re

import pytest

from cxr.runtime.safepaths import UnsafePathError, open_output, output_name_for, safe_join

PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

HOSTILE_INPUTS = [
    "../../etc/passwd",
    "/etc/shadow",
    "scan/../../../root/.ssh/id_rsa",
    "a/b/../../../../x.png",
    "..",
    ".",
    "/",
    "-rf.png",
    ".hidden.png",
    "<img src=x onerror=alert(1)>.png",
    "=cmd|' /C calc'!A0.png",
    "CON.png",
    "nul",
    "a\\..\\..\\win.png",
    "C:\\Windows\\System32\\x.png",
    "spaces and\ttabs\nnewline.png",
    "Ärztin_Röntgen_胸部.png",
    os.fsdecode(b"caf\xe9-latin1.png"),  # not UTF-8
    os.fsdecode(b"\xff\xfe\xfd.png"),
    "x" * 5000 + ".png",
    "d/" * 300 + "deep.png",
]


@pytest.mark.parametrize("inp", HOSTILE_INPUTS)
def test_names_are_plain_and_joinable(tmp_path, inp):
    name = output_name_for(inp, root=str(tmp_path), suffix=".cam.png")
    assert PLAIN.match(name), name
    assert name.endswith(".cam.png")
    assert os.sep not in name and "/" not in name and "\\" not in name
    assert len(name.encode()) <= 255  # every common file system's limit
    target = safe_join(tmp_path, name)
    assert os.path.dirname(target) == str(tmp_path)
    with open_output(tmp_path, name) as fh:  # really writable
        fh.write(b"ok")
    assert (tmp_path / name).read_bytes() == b"ok"


def test_unique_and_deterministic(tmp_path):
    names = [output_name_for(p, root="/data", suffix=".png") for p in HOSTILE_INPUTS]
    assert len(set(names)) == len(names)
    assert names == [output_name_for(p, root="/data", suffix=".png") for p in HOSTILE_INPUTS]


def test_slug_collisions_are_told_apart_by_the_hash():
    # all three slug to "a_b"; the hash of the full path keeps them apart
    a = output_name_for("/data/a/b.png", root="/data")
    b = output_name_for("/data/a_b.png", root="/data")
    c = output_name_for("/data/a b.png", root="/data")
    assert len({a, b, c}) == 3
    assert all(n.startswith("a_b-") for n in (a, b, c))
    # the same file name in two scanned folders
    assert output_name_for("/x/img.png", root="/x") != output_name_for("/y/img.png", root="/y")
    # two undecodable names differing only in the bad byte
    assert output_name_for(b"/d/\xe9.png") != output_name_for(b"/d/\xe8.png")


def test_readable_slug():
    assert output_name_for("/data/COVID/images/COVID-1.png", root="/data", suffix=".cam.png").startswith(
        "COVID_images_COVID-1-")
    assert output_name_for("/elsewhere/COVID-1.png", root="/data").startswith("COVID-1-")  # not under root
    assert output_name_for("rel/Ärztin.png").startswith("Arztin-")
    assert re.fullmatch(r"[0-9a-f]{12}\.png", output_name_for("/d/胸部.png", suffix=".png"))


def test_bytes_and_str_paths_agree():
    raw = b"/d/caf\xe9.png"
    assert output_name_for(raw) == output_name_for(os.fsdecode(raw))


@pytest.mark.parametrize("suffix", ["/x.png", "../x", "a\x00", "x" * 40, ".png\n", "..", ".png."])
def test_bad_suffix_refused(suffix):
    with pytest.raises(UnsafePathError):
        output_name_for("/d/a.png", suffix=suffix)


@pytest.mark.parametrize("name", ["../x.png", "a/../../x.png", "/etc/passwd", "", ".", "a\x00b",
                                  "sub/..", "..\\x.png"])
def test_safe_join_refuses_escapes(tmp_path, name):
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, name)


def test_safe_join_allows_plain_subfolders(tmp_path):
    assert safe_join(tmp_path, "heatmaps/a.png") == os.path.join(str(tmp_path), "heatmaps/a.png")


def test_symlink_inside_out_dir_cannot_redirect(tmp_path):
    out = tmp_path / "out"
    outside = tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / "sub")  # a planted folder link
    with pytest.raises(UnsafePathError, match="outside"):
        safe_join(out, "sub/x.png")
    os.symlink(outside / "victim.txt", out / "x.png")  # a planted file link (dangling)
    with pytest.raises(UnsafePathError):
        safe_join(out, "x.png")
    with pytest.raises(UnsafePathError):
        open_output(out, "x.png")
    assert not (outside / "victim.txt").exists()


def test_open_output_does_not_follow_a_link_to_inside(tmp_path):
    # even a link that resolves inside is not written through (O_NOFOLLOW)
    (tmp_path / "real.png").write_bytes(b"keep")
    os.symlink(tmp_path / "real.png", tmp_path / "alias.png")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        open_output(tmp_path, "alias.png")
    assert (tmp_path / "real.png").read_bytes() == b"keep"


def test_out_dir_itself_may_be_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    name = output_name_for("/d/../../a.png", suffix=".png")
    with open_output(tmp_path / "link", name) as fh:
        fh.write(b"1")
    assert (real / name).read_bytes() == b"1"
