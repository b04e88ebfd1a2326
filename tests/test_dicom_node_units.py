"""The DICOM node's pieces that need no network: derived UIDs, the intake checks, the extra's
import boundary. (test_dicom_node.py runs the node against Orthanc and dcmtk.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cxr.runtime.node.uids import derived_uid, result_uids


def test_derived_uids_are_stable_distinct_and_valid():
    from cxr.runtime.node.intake import valid_uid

    a = result_uids("1.2.3.4", "1.2.3", "ab" * 32)
    assert a == result_uids("1.2.3.4", "1.2.3", "ab" * 32), "the same film and model must give the same UIDs"
    assert len(set(a.values())) == len(a)
    assert a["sr"] != result_uids("1.2.3.5", "1.2.3", "ab" * 32)["sr"], "another film, another SR"
    assert a["sr"] != result_uids("1.2.3.4", "1.2.3", "cd" * 32)["sr"], "another model, another SR"
    assert a["sr_series"] == result_uids("1.2.3.9", "1.2.3", "ab" * 32)["sr_series"], "one series per study"
    for uid in a.values():
        assert uid.startswith("2.25.") and valid_uid(uid) and len(uid) <= 64
    assert derived_uid("sr", "../../etc/passwd", "x").startswith("2.25.")


def test_intake_refuses_what_the_engine_could_not_read():
    pytest.importorskip("pydicom")
    from dicom_films import CR, chest_pixels, film_dataset
    from pydicom.uid import ExplicitVRLittleEndian

    from cxr.runtime.node import intake

    def status(ds, ts=ExplicitVRLittleEndian, size=1000):
        r = intake.check_film(ds, ts, size)
        return None if r is None else r.status

    assert status(film_dataset(chest_pixels())) is None
    assert status(film_dataset(chest_pixels(), sop_class=CR)) is None
    assert status(film_dataset(chest_pixels(), sop_class="1.2.840.10008.5.1.4.1.1.7")) == intake.NOT_SUPPORTED
    ds = film_dataset(chest_pixels())
    ds.PixelData = ds.PixelData[:-2]
    assert status(ds) == intake.PIXELS_TRUNCATED
    ds = film_dataset(chest_pixels())
    ds.Rows = ds.Columns = 9000
    assert status(ds) == intake.TOO_LARGE
    assert status(film_dataset(chest_pixels()), size=intake.MAX_DATASET_BYTES + 1) == intake.TOO_LARGE
    ds = film_dataset(chest_pixels())
    del ds.StudyInstanceUID
    assert status(ds) == intake.DOES_NOT_MATCH
    ds = film_dataset(chest_pixels())
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SOPInstanceUID = "1.2.03"  # a leading zero: not a UID
    assert status(ds) == intake.DOES_NOT_MATCH
    assert status(film_dataset(None)) == intake.DOES_NOT_MATCH


def test_cli_loads_no_dicom_networking_until_listen_runs():
    code = ("import sys, cxr.runtime.cli; "
            "print(sorted(m for m in ('pynetdicom', 'highdicom', 'pydicom', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_listen_without_the_extra_names_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cxr.runtime.cli import cli

    monkeypatch.setitem(sys.modules, "pynetdicom", None)  # as if not installed: import raises ImportError
    res = CliRunner().invoke(cli, ["listen", "--port", "11112", "--send-to", "PACS@127.0.0.1:4242",
                                   "--state", str(tmp_path / "s")])
    assert res.exit_code == 2
    assert 'pip install "cxr-infer[dicom]"' in res.output and "pynetdicom" in res.output
    assert not (tmp_path / "s").exists(), "nothing is written before the node can run"
