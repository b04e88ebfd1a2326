"""``cxr-infer listen`` against real components: Orthanc as the PACS (its own config file,
loopback ports), dcmtk's storescu/echoscu as the modality (and, in one test, Orthanc itself
forwarding films, configured as docs/dicom-node.md shows), dicom3tools' dciodvfy on every SR and
highdicom reading them back. Skips, saying why, when one of them is not installed."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pynetdicom", reason='the DICOM node needs pip install ".[dicom]"')
hd = pytest.importorskip("highdicom", reason='the DICOM node needs pip install ".[dicom]"')
import pydicom  # noqa: E402

from dicom_films import CR, chest_pixels, film_dataset, write_film  # noqa: E402
from pacs import Orthanc, dciodvfy, dcmtk, free_port, wait_for  # noqa: E402

RESEARCH = "research use, not for diagnosis"


@pytest.fixture(scope="module")
def cam_model(tmp_path_factory) -> Path:
    pytest.importorskip("onnx", reason="building the test model needs onnx (pip install '.[dev]')")
    from tiny_cam_model import build_tiny_cam_model

    return build_tiny_cam_model(tmp_path_factory.mktemp("node-model") / "tiny-cam.onnx")


@pytest.fixture
def pacs(tmp_path):
    o = Orthanc(tmp_path / "orthanc")
    yield o
    o.stop()


class Node:
    """One ``cxr-infer listen`` process."""

    def __init__(self, state: Path, send_to: str, model: Path, *extra: str, port: int | None = None,
                 aet: str = "CXR"):
        self.state, self.port, self.aet = state, port or free_port(), aet
        self.args = [sys.executable, "-m", "cxr.runtime.cli", "listen", "--port", str(self.port), "--aet", aet,
                     "--send-to", send_to, "--state", str(state), "--model", str(model), "--threads", "1", *extra]
        self.runs = 0
        self.start()

    def start(self) -> None:
        self.runs += 1
        self.log_path = self.state.parent / f"{self.state.name}-stderr-{self.runs}.log"
        self.log_fh = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self.log_fh, stderr=subprocess.STDOUT)
        wait_for(f"the node to answer C-ECHO on port {self.port}", self._answers, timeout=90)

    def _answers(self):
        if self.proc.poll() is not None:
            pytest.fail(f"listen exited with {self.proc.returncode}:\n{self.log()}")
        return echo(self.port, self.aet).returncode == 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def full_log(self) -> str:
        return (self.state / "node.log").read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log_fh.close()

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                pytest.fail(f"listen did not stop within 60 s of SIGTERM:\n{self.log()}")
        self.log_fh.close()
        return self.proc.returncode


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for n in started:
        if n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait()


def echo(port: int, aet: str, calling: str = "ECHOSCU"):
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", aet, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def store(port: int, aet: str, *files, calling: str = "MODALITY", extra=()):
    return subprocess.run([dcmtk("storescu"), "-v", *extra, "-aet", calling, "-aec", aet, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=300)


def srs_in(pacs: Orthanc, study_uid: str | None = None) -> list[dict]:
    return pacs.instances("SR", study_uid)


def read_sr(pacs: Orthanc, inst: dict, tmp: Path):
    """(highdicom SR, path of the downloaded file), after dciodvfy found no error in it."""
    path = tmp / f"{inst['ID']}.dcm"
    path.write_bytes(pacs.file(inst["ID"]))
    check_dciodvfy(path)
    return hd.sr.srread(path), path


def check_dciodvfy(path: Path) -> None:
    out = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, f"dciodvfy found errors in {path}:\n" + "\n".join(errors)


def content_items(sr) -> list:
    """Every content item of the SR tree, depth first."""
    out = []

    def walk(items):
        for item in items:
            out.append(item)
            walk(getattr(item, "ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def meanings(sr) -> dict[str, list]:
    """concept name meaning -> values (code meaning, number or text) of the SR's items."""
    out: dict[str, list] = {}
    for item in content_items(sr):
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "CODE":
            value = item.ConceptCodeSequence[0].CodeMeaning
        elif item.ValueType == "NUM":
            value = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT":
            value = item.TextValue
        else:
            continue
        out.setdefault(name, []).append(value)
    return out


def csv_rows(state: Path) -> list[dict]:
    with open(state / "results.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_films_in_sr_out_in_their_study(tmp_path, pacs, cam_model, nodes, classifier_factory):
    films = tmp_path / "films"
    study_a, study_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    frontal = write_film(films / "frontal.dcm", chest_pixels(1), study_uid=study_a)
    lateral = write_film(films / "lateral.dcm", chest_pixels(2), study_uid=study_a, ViewPosition="LL")
    cr = write_film(films / "cr.dcm", chest_pixels(3), study_uid=study_b, sop_class=CR)
    node = Node(tmp_path / "state", pacs.address, cam_model, "--heatmap")
    nodes.append(node)
    sent = store(node.port, node.aet, frontal, lateral, cr)
    assert sent.returncode == 0, sent.stderr
    wait_for("3 SRs in Orthanc", lambda: len(srs_in(pacs)) == 3, timeout=120)
    wait_for("2 heatmap captures in Orthanc", lambda: len(pacs.instances("OT")) == 2, timeout=60)

    sha = __import__("hashlib").sha256(cam_model.read_bytes()).hexdigest()
    from cxr.runtime.node.uids import derived_uid

    by_film = {}
    for inst in srs_in(pacs):
        sr, _ = read_sr(pacs, inst, tmp_path)
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        film_uid = ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        by_film[film_uid] = sr
        assert sr.SOPInstanceUID == derived_uid("sr", film_uid, sha)
        assert RESEARCH in sr.SeriesDescription
        assert isinstance(sr.ContentSequence, pydicom.sequence.Sequence)
    f, l, c = (pydicom.dcmread(p) for p in (frontal, lateral, cr))
    assert set(by_film) == {f.SOPInstanceUID, l.SOPInstanceUID, c.SOPInstanceUID}
    assert by_film[f.SOPInstanceUID].StudyInstanceUID == study_a == by_film[l.SOPInstanceUID].StudyInstanceUID
    assert by_film[c.SOPInstanceUID].StudyInstanceUID == study_b

    # the same engine as scan: identical prediction, probabilities and input check
    expected = {r.path: r for r in classifier_factory(cam_model).classify_many([frontal, lateral, cr])}
    for path, ds in ((frontal, f), (lateral, l), (cr, c)):
        want = expected[str(path)].prediction
        got = meanings(by_film[ds.SOPInstanceUID])
        for cls, p in want.probabilities.items():
            assert got[f"Probability of {cls}"] == [pytest.approx(p, abs=1e-6)]
        if want.diagnosis_withheld:
            assert "Finding" not in got, "a withheld film's SR must not carry a finding"
            assert "lateral" in got["Diagnosis withheld"][0]
        else:
            from cxr.runtime.node.sr import class_code

            assert got["Finding"] == [class_code(want.label).meaning]
        assert len(got["Input check"]) == 1

    rows = csv_rows(node.state)
    from cxr.runtime.output import columns

    assert list(rows[0]) == columns(["COVID", "Normal", "Viral Pneumonia"])
    assert sorted(r["path"] for r in rows) == sorted(by_film)
    lateral_row = next(r for r in rows if r["path"] == l.SOPInstanceUID)
    assert lateral_row["qc"] == "not_frontal" and lateral_row["prediction"] == "" and lateral_row["triage"] == "refer"
    assert f"classified film {l.SOPInstanceUID}: withheld (qc not_frontal" in node.full_log(), \
        "a withheld film must be reported in the node's log"

    # the heatmap captures: valid, labelled, in the film's study, burnt-in annotation declared
    for inst in pacs.instances("OT"):
        path = tmp_path / f"sc-{inst['ID']}.dcm"
        path.write_bytes(pacs.file(inst["ID"]))
        check_dciodvfy(path)
        sc = pydicom.dcmread(path)
        assert RESEARCH in sc.SeriesDescription and sc.BurnedInAnnotation == "YES"
        assert sc.StudyInstanceUID in (study_a, study_b) and sc.pixel_array.shape[-1] == 3

    # a film sent again gets no second result; echo still works; SIGTERM stops cleanly
    again = store(node.port, node.aet, frontal)
    assert again.returncode == 0, again.stderr
    assert "already classified" in wait_for("the node to log the repeat", lambda: "already classified"
                                            in node.full_log() and node.full_log())
    assert len(srs_in(pacs)) == 3 and len(csv_rows(node.state)) == 3
    assert echo(node.port, node.aet).returncode == 0
    assert node.terminate() == 0
    assert "stopped" in node.full_log()


@pytest.fixture(scope="module")
def classifier_factory():
    from cxr.runtime import Classifier

    return lambda path: Classifier.load(path, threads=1, workers=1)


def test_bad_films_get_failure_statuses_and_the_node_keeps_serving(tmp_path, pacs, cam_model, nodes):
    from pydicom.encaps import encapsulate

    bad = tmp_path / "bad"
    cases = {}  # name -> (file, status, log fragment)
    cases["report"] = (write_film(bad / "report.dcm", None, sop_class="1.2.840.10008.5.1.4.1.1.88.11"),
                       "0x0122", "not a CR or DX film")
    ds = film_dataset(chest_pixels())
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    ds.save_as(bad / "truncated.dcm", enforce_file_format=True)
    cases["truncated"] = (bad / "truncated.dcm", "0xC212", "pixel data cut short")
    ds = film_dataset(chest_pixels())
    ds.Rows = ds.Columns = 10000
    ds.save_as(bad / "huge.dcm", enforce_file_format=True)
    cases["huge"] = (bad / "huge.dcm", "0xC213", "over the 80 MP limit")
    ds = film_dataset(chest_pixels())
    del ds.Rows
    ds.save_as(bad / "no-rows.dcm", enforce_file_format=True)
    cases["no-rows"] = (bad / "no-rows.dcm", "0xA900", "Rows/Columns")
    raw = (bad / "truncated.dcm").read_bytes()
    (bad / "cut-mid-header.dcm").write_bytes(raw[:600])  # storescu sends what it could parse
    cases["cut-mid-header"] = (bad / "cut-mid-header.dcm", "0xA900", "missing StudyInstanceUID")
    ds = film_dataset(chest_pixels())
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../../../" + str(tmp_path / "escaped")
        ds.save_as(bad / "path-uid.dcm", enforce_file_format=True)
    cases["path-uid"] = (bad / "path-uid.dcm", "0xA900", "not a valid UID")

    node = Node(tmp_path / "state", pacs.address, cam_model)
    nodes.append(node)
    for name, (path, status, fragment) in cases.items():
        out = store(node.port, node.aet, path)
        assert out.returncode != 0, f"{name}: storescu reported success:\n{out.stdout}{out.stderr}"
        assert f"{status} " in node.full_log() and fragment in node.full_log(), \
            f"{name}: no refusal {status} ({fragment}) in the log:\n{node.full_log()}"
    # an undecodable transfer syntax (JPEG Lossless SV1: no pydicom decoder without pylibjpeg)
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    if not get_decoder(JPEGLosslessSV1).is_available:
        ds = film_dataset(chest_pixels(), transfer_syntax=JPEGLosslessSV1)
        ds.PixelData = encapsulate([b"\xff\xd8not really jpeg\xff\xd9"])
        ds.save_as(bad / "jpeg-lossless.dcm", enforce_file_format=True)
        out = store(node.port, node.aet, bad / "jpeg-lossless.dcm", extra=("-xs", "-R"))
        assert out.returncode != 0
        assert "0xC211 " in node.full_log() and "has no pixel decoder" in node.full_log()

    # AE titles outside --allow are refused; nothing was written outside the state folder
    assert not (tmp_path / "escaped").exists()
    good = write_film(tmp_path / "good.dcm", chest_pixels(5))
    assert store(node.port, node.aet, good).returncode == 0, "the node stopped serving after bad input"
    wait_for("the good film's SR", lambda: len(srs_in(pacs)) == 1, timeout=120)
    assert len(srs_in(pacs)) == 1, "a refused film produced a result"
    for folder, _dirs, files in os.walk(node.state):
        for name in files:
            stem = name.split(".")[0]
            assert stem in ("lock", "node", "results", "ledger", "status") or all(
                ch in "0123456789abcdef" for ch in stem), f"unexpected file {folder}/{name}"
    assert node.terminate() == 0


def test_calling_ae_titles_outside_allow_are_refused(tmp_path, pacs, cam_model, nodes):
    node = Node(tmp_path / "state", pacs.address, cam_model, "--allow", "MODALITY", "--allow", "ECHOSCU")
    nodes.append(node)
    film = write_film(tmp_path / "film.dcm", chest_pixels(7))
    out = store(node.port, node.aet, film, calling="INTRUDER")
    assert out.returncode != 0 and "Rejected" in (out.stdout + out.stderr), out.stdout + out.stderr
    assert "refused association from INTRUDER" in node.full_log()
    assert store(node.port, node.aet, film, calling="MODALITY").returncode == 0
    wait_for("the allowed film's SR", lambda: len(srs_in(pacs)) == 1, timeout=120)
    assert len(csv_rows(node.state)) == 1
    node.terminate()


def test_kill_9_mid_batch_then_resend_gives_one_sr_per_film(tmp_path, pacs, cam_model, nodes):
    films = []
    for s in range(5):
        study = pydicom.uid.generate_uid()
        for k in range(3):
            films.append(write_film(tmp_path / "batch" / f"s{s}-{k}.dcm", chest_pixels(10 * s + k), study_uid=study))
    node = Node(tmp_path / "state", pacs.address, cam_model)
    nodes.append(node)
    modality = subprocess.Popen([dcmtk("storescu"), "-aet", "MODALITY", "-aec", node.aet, "127.0.0.1",
                                 str(node.port), *map(str, films)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    # kill once a third has arrived: some films classified, some sent, some only on disk, the rest in flight
    wait_for("a third of the batch to arrive", lambda: node.full_log().count("received film") >= len(films) // 3,
             timeout=120, interval=0.01)
    node.kill9()
    modality.wait(timeout=120)
    before = len(srs_in(pacs))
    received = node.full_log().count("received film")
    classified = node.full_log().count("classified film")
    print(f"kill -9 after {received} of {len(films)} films received, {classified} classified, {before} SRs in the PACS")
    node.start()  # a restart finishes what was pending; the modality then sends the whole batch again
    out = store(node.port, node.aet, *films)
    assert out.returncode == 0, out.stderr
    wait_for(f"{len(films)} SRs in Orthanc", lambda: len(srs_in(pacs)) >= len(films), timeout=180)
    srs = srs_in(pacs)
    assert len(srs) == len(films), f"{len(srs)} SRs for {len(films)} films (kill after {received} received, " \
                                   f"{before} SRs in the PACS)"
    referenced = []
    for inst in srs:
        sr, _ = read_sr(pacs, inst, tmp_path)
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        referenced.append(ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in films]
    assert sorted(referenced) == sorted(sops), "each film must have exactly one SR"
    studies = {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in films}
    for study in studies:
        assert len(srs_in(pacs, study)) == 3
    rows = csv_rows(node.state)
    assert sorted(r["path"] for r in rows) == sorted(sops), "each film must have exactly one row"
    assert node.terminate() == 0


def test_results_wait_for_a_pacs_that_is_down_and_survive_kill_9(tmp_path, cam_model, nodes):
    dicom_port = free_port()
    node = Node(tmp_path / "state", f"PACS@127.0.0.1:{dicom_port}", cam_model)
    nodes.append(node)
    films = [write_film(tmp_path / f"f{i}.dcm", chest_pixels(40 + i)) for i in range(3)]
    assert store(node.port, node.aet, *films).returncode == 0
    wait_for("3 results queued", lambda: len(list((node.state / "outbox").glob("*.sr.dcm"))) == 3, timeout=120)
    wait_for("a failed send in the log", lambda: "retry in" in node.full_log(), timeout=60)
    status = subprocess.run([sys.executable, "-m", "cxr.runtime.cli", "listen", "--status", "--state",
                             str(node.state)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "results queued    3" in status.stdout, status.stdout + status.stderr
    assert "failed" in status.stdout
    node.kill9()
    pacs = Orthanc(tmp_path / "orthanc", dicom_port=dicom_port)  # the PACS comes up on the port it was given
    try:
        node.start()
        wait_for("the queued SRs in Orthanc", lambda: len(srs_in(pacs)) == 3, timeout=120)
        wait_for("an empty outbox", lambda: not list((node.state / "outbox").iterdir()), timeout=30)
        assert len(csv_rows(node.state)) == 3
        assert node.terminate() == 0
    finally:
        pacs.stop()


def orthanc_setup_from_doc() -> tuple[dict, str, str]:
    """The Orthanc settings, Lua script and hand-send body that docs/dicom-node.md shows, so that
    this test runs what the doc tells a site to deploy."""
    import json
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "dicom-node.md").read_text()
    part = doc[doc.index("**Orthanc** (`orthanc.json`)"):doc.index("**dcm4chee-arc 5**")]
    blocks = {m.group(1): m.group(2) for m in re.finditer(r"```(\w+)\n(.*?)```", part, re.S)}
    assert set(blocks) == {"json", "lua", "bash"}, f"the doc's Orthanc section changed shape: {sorted(blocks)}"
    settings = json.loads("{" + blocks["json"] + "}")
    body = re.search(r"-d '(\{.*\})'", blocks["bash"])
    assert body, f"no JSON body in the doc's hand-send command:\n{blocks['bash']}"
    return settings, blocks["lua"], body.group(1)


def test_orthanc_forwards_films_to_the_node_and_gets_one_sr_each(tmp_path, cam_model, nodes):
    """PACS -> node -> SR back into the PACS, the way a site deploys it: Orthanc, configured as
    docs/dicom-node.md shows, forwards each film on arrival (Lua) or by hand (REST)."""
    import urllib.error

    settings, lua, hand_body = orthanc_setup_from_doc()
    (name, (node_aet, _host, _port)), = settings["DicomModalities"].items()
    node_port = free_port()
    # The doc's settings, on loopback, with DicomAlwaysAllowStore off: the node being listed in
    # DicomModalities must be enough for its results to be stored (the doc says so).
    pacs = Orthanc(tmp_path / "orthanc", aet="ORTHANC", lua=lua,
                   modalities={name: [node_aet, "127.0.0.1", node_port]}, DicomAlwaysAllowStore=False)
    try:
        study_a, study_b = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        films = {"early": write_film(tmp_path / "early.dcm", chest_pixels(21), study_uid=study_b, sop_class=CR),
                 "frontal": write_film(tmp_path / "frontal.dcm", chest_pixels(22), study_uid=study_a),
                 "lateral": write_film(tmp_path / "lateral.dcm", chest_pixels(23), study_uid=study_a,
                                       ViewPosition="LL")}
        sop = {k: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for k, p in films.items()}
        study_of = {"early": study_b, "frontal": study_a, "lateral": study_a}

        # a film that lands while the node is down: Orthanc's one forwarding attempt fails, no retry
        early = pacs.upload(films["early"])
        wait_for("Orthanc to log its failed forward", lambda: f"Unable to send instance {early}"
                 in (pacs.root / "orthanc.log").read_text(errors="replace"), timeout=60)

        node = Node(tmp_path / "state", pacs.address, cam_model, "--allow", pacs.aet, "--allow", "ECHOSCU",
                    port=node_port, aet=node_aet)  # ECHOSCU: Node's readiness probe
        nodes.append(node)
        for k in ("frontal", "lateral"):  # forwarded on arrival by the doc's Lua script
            pacs.upload(films[k])
        wait_for("the 2 forwarded films' SRs in their study", lambda: len(srs_in(pacs, study_a)) == 2, timeout=180)
        assert "refused film" not in node.full_log(), \
            f"the Lua script forwarded something that is not a film (the node's own SR?):\n{node.full_log()}"

        # by hand, with the doc's command: the study that missed its forward
        def orthanc_id(study):
            found, = pacs.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study}})
            return found

        sent = pacs.post(f"/modalities/{name}/store", json_body(hand_body, orthanc_id(study_b)), timeout=120)
        assert sent["InstancesCount"] == 1, sent
        wait_for("the hand-sent film's SR", lambda: len(srs_in(pacs, study_b)) == 1, timeout=180)

        # study A again, which now holds the node's 2 SRs beside its 2 films: without "Permissive"
        # Orthanc gives up at the first SR the node refuses (0x0122); with it, every instance goes
        with pytest.raises(urllib.error.HTTPError) as refused:
            pacs.post(f"/modalities/{name}/store", [orthanc_id(study_a)], timeout=120)
        assert refused.value.code == 500 and "0x0122" in refused.value.read().decode(errors="replace")
        before = len(node.full_log())
        sent = pacs.post(f"/modalities/{name}/store", json_body(hand_body, orthanc_id(study_a)), timeout=120)
        assert sent["InstancesCount"] == 4, sent
        tail = node.full_log()[before:]
        assert tail.count("0x0122 SOP class not supported") == 2, tail
        assert all(f"film {sop[k]} from {pacs.aet} already classified" in tail for k in ("frontal", "lateral")), tail

        # exactly one SR per film, in the film's study, and one row per film
        refs = []
        for inst in srs_in(pacs):
            sr, _ = read_sr(pacs, inst, tmp_path)
            ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            refs.append((ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID, sr.StudyInstanceUID))
        assert sorted(refs) == sorted((sop[k], study_of[k]) for k in sop), "each film: one SR, in its own study"
        assert sorted(r["path"] for r in csv_rows(node.state)) == sorted(sop.values()), "one row per film"
        assert node.terminate() == 0
    finally:
        pacs.stop()


def json_body(template: str, orthanc_id: str):
    import json

    return json.loads(template.replace("<orthanc study id>", orthanc_id))
