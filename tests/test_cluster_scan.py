"""``cxr-infer scan --scheduler``: a real Dask scheduler and two workers on loopback, started here.

Every cluster scan runs as a real ``cxr-infer`` process against real ``dask scheduler`` /
``dask worker`` processes; each wait is bounded (no test hangs on a cluster that never comes up).
The rows must be those of a local scan, byte for byte.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

distributed = pytest.importorskip("distributed", reason="the cluster scan needs pip install '.[cluster]'")
pytest.importorskip("pydicom")

from cxr.runtime.cluster import (ClusterError, ModelSpec, ShardJob, WorkerCannotRead, iter_shards,  # noqa: E402
                                 parse_scheduler, scan_shard)
from cxr.runtime.discover import Entry  # noqa: E402
from synthetic import shaded, write_bad_files, write_good_images, write_skippable  # noqa: E402

RUN_TIMEOUT = 240  # seconds any one cxr-infer process may take here (2 shared cores)
START_TIMEOUT = 90  # for the scheduler and the workers to come up


@contextmanager
def dask_cluster(tmp: Path, n_workers: int = 2):
    """A scheduler and ``n_workers`` single-thread workers (no nanny: a killed worker stays dead)."""
    tmp.mkdir(parents=True, exist_ok=True)
    sched_file = tmp / "scheduler.json"
    log = open(tmp / "dask.log", "wb")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=log, stderr=subprocess.STDOUT)]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sched_file.exists(), f"the Dask scheduler did not start: {(tmp / 'dask.log').read_text()[-2000:]}"
        time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(n_workers):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                                           "--nthreads", "1", "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                                           "--name", f"w{i}"], stdout=log, stderr=subprocess.STDOUT))
        with distributed.Client(address, timeout=START_TIMEOUT) as client:
            client.wait_for_workers(n_workers, timeout=START_TIMEOUT)
            pids = client.run(os.getpid)  # worker address -> its process id
        yield address, pids
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_cluster(tmp_path_factory.mktemp("dask")) as c:
        yield c


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Good, bad and skippable files, a symlink, a non-UTF-8 name: the local scan's hard cases."""
    root = tmp_path_factory.mktemp("archive")
    write_good_images(root / "good")
    write_bad_files(root / "bad")
    write_skippable(root / "clutter")
    os.symlink(root / "good" / "gray8_dark.png", root / "good" / "link_to_dark.png")
    Image.fromarray(shaded(16, 16, 235)).save(os.path.join(os.fsencode(root / "good"), b"caf\xe9-latin1.png"))
    (root / "many").mkdir()
    for i in range(30):
        Image.fromarray(shaded(40, 40, 10 + 8 * i)).save(root / "many" / f"{i:03d}.png")
    return root


def cxr(*args, cwd=None, timeout=RUN_TIMEOUT):
    return subprocess.run([sys.executable, "-m", "cxr.runtime.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          timeout=timeout)


def local_scan(tmp: Path, model, paths, name="local.csv", cwd=None, *extra):
    out = tmp / name
    r = cxr("scan", *paths, "--model", model, "-o", out, *extra, cwd=cwd)
    assert r.returncode in (0, 1, 3), r.stderr.decode()
    return out


def test_parse_scheduler_and_shards(tmp_path):
    assert parse_scheduler("local:3") == ("local", 3)
    assert parse_scheduler("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    for bad in ("local:0", "local:x", "nonsense"):
        with pytest.raises(ClusterError):
            parse_scheduler(bad)
    for i in range(7):
        Image.fromarray(shaded(8, 8, 100)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.xlsx").write_bytes(b"PK")
    shards = list(iter_shards([tmp_path], 3))
    assert [s.files for s in shards] == [3, 3, 1]
    assert sum(sum(s.skips.values()) for s in shards) == 1  # skipped entries ride along as counts
    assert [p for s in shards for p in s.shown] == sorted(str(tmp_path / f"{i}.png") for i in range(7))
    assert all(os.path.isabs(e.path) for s in shards for e in s.entries)
    assert [s.digest for s in shards] == [s.digest for s in iter_shards([tmp_path], 3)]


def test_rows_identical_to_a_local_scan(tmp_path, cluster, archive, tiny_model_path):
    address, _ = cluster
    # relative paths, as a user types them: the rows must show them as a local scan does
    local = local_scan(tmp_path, tiny_model_path, ["good", "bad", "clutter", "many"], cwd=archive)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"cluster.{fmt}"
        r = cxr("scan", "good", "bad", "clutter", "many", "--model", tiny_model_path, "-o", out, "--format", fmt,
                "--scheduler", address, "--shard-size", 4, "--report", tmp_path / "rep.json", cwd=archive)
        assert r.returncode == 1, r.stderr.decode()  # the bad files are error rows, as locally
        if fmt == "csv":
            assert out.read_bytes() == local.read_bytes()
        else:
            loc = local_scan(tmp_path, tiny_model_path, ["good", "bad", "clutter", "many"], "local.jsonl", archive)
            assert out.read_bytes() == loc.read_bytes()
    err = r.stderr.decode()
    loc_err = cxr("scan", "good", "bad", "clutter", "many", "--model", tiny_model_path, "-o", tmp_path / "x.csv",
                  cwd=archive).stderr.decode()
    # the same summary: files, classified, errors and skipped (with reasons)
    assert err.split(" in ")[0].split("\n")[-1] == loc_err.split(" in ")[0].split("\n")[-1]
    assert [ln for ln in err.splitlines() if ln.startswith("  skipped")] == \
           [ln for ln in loc_err.splitlines() if ln.startswith("  skipped")]
    rep = json.loads((tmp_path / "rep.json").read_text())
    rows = list(csv.DictReader(open(local, encoding="utf-8")))
    c = rep["cluster"]
    assert c["scheduler"] == address and c["shard_size"] == 4
    assert c["shards_this_run"] == -(-len(rows) // 4)
    assert sum(w["files"] for w in c["workers"]) == len(rows)
    assert sum(w["classified"] for w in c["workers"]) == rep["images_classified"]
    assert all(w["intra_op_threads"] == 1 and w["shards"] >= 1 for w in c["workers"])  # --nthreads 1 workers
    assert rep["summary"]["errors"] == sum(r["status"] == "error" for r in rows)


def test_stdout_rows_identical(cluster, archive, tiny_model_path):
    address, _ = cluster
    loc = cxr("scan", archive / "good", "--model", tiny_model_path)
    cl = cxr("scan", archive / "good", "--model", tiny_model_path, "--scheduler", address, "--shard-size", 5)
    assert cl.returncode == loc.returncode, cl.stderr.decode()
    assert cl.stdout == loc.stdout and cl.stdout.count(b"\n") > 10


def test_local_cluster(tmp_path, archive, tiny_model_path):
    local = local_scan(tmp_path, tiny_model_path, [archive / "many"])
    out = tmp_path / "lc.csv"
    r = cxr("scan", archive / "many", "--model", tiny_model_path, "-o", out, "--scheduler", "local:2",
            "--shard-size", 7)
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == local.read_bytes()
    assert "2 workers" in r.stderr.decode() or "1 workers" in r.stderr.decode()


def test_resume_skips_done_shards_and_drops_a_torn_shard(tmp_path, cluster, archive, tiny_model_path):
    address, _ = cluster
    local = local_scan(tmp_path, tiny_model_path, [archive])
    out = tmp_path / "r.csv"
    ledger = Path(str(out) + ".shards.jsonl")
    args = ("scan", archive, "--model", tiny_model_path, "-o", out, "--scheduler", address, "--shard-size", 5)
    assert cxr(*args).returncode == 1
    lines = ledger.read_text().splitlines()
    total = len(lines) - 1
    assert total >= 5
    # as if the scan had been killed while appending shard 3: two shards recorded, part of the next written
    keep = json.loads(lines[2])
    ledger.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    data = out.read_bytes()
    out.write_bytes(data[:keep["end"]] + data[keep["end"]:keep["end"] + 120])
    r = cxr(*args, "--resume", "--report", tmp_path / "rep.json")
    assert r.returncode == 1, r.stderr.decode()
    assert out.read_bytes() == local.read_bytes()  # no row lost, none twice
    assert "resumed: 2 shards (10 files)" in r.stderr.decode()
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["cluster"]["shards_resumed"] == 2 and rep["cluster"]["shards_this_run"] == total - 2
    assert len(ledger.read_text().splitlines()) == total + 1
    # a finished scan resumed again: nothing to do, the file unchanged
    r = cxr(*args, "--resume")
    assert r.returncode == 1 and out.read_bytes() == local.read_bytes()
    # a resume that does not fit the ledger is refused, and leaves the file alone
    r = cxr(*args[:-1], 6, "--resume")
    assert r.returncode == 2 and b"shard_size" in r.stderr and out.read_bytes() == local.read_bytes()
    r = cxr("scan", archive, "--model", tiny_model_path, "-o", tmp_path / "r.json", "--scheduler", address,
            "--resume")
    assert r.returncode == 2 and b"JSON array" in r.stderr


def test_worker_killed_mid_run_costs_only_its_shards(tmp_path, archive, tiny_model_path):
    """SIGKILL one of two workers while it scans: Dask reruns its shards, no file gets two rows."""
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(shaded(1600, 1600, 128)).save(folder / "000.png")  # decode-bound, like real films
    for i in range(1, 160):
        shutil.copy(folder / "000.png", folder / f"{i:03d}.png")
    local = local_scan(tmp_path, tiny_model_path, [folder])
    out = tmp_path / "k.csv"
    ledger = Path(str(out) + ".shards.jsonl")
    with dask_cluster(tmp_path / "dask") as (address, pids), distributed.Client(address, timeout=30) as client:
        args = ["scan", folder, "--model", tiny_model_path, "-o", out, "--scheduler", address, "--shard-size", 8]
        scan = subprocess.Popen([sys.executable, "-m", "cxr.runtime.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            victim = None
            deadline = time.monotonic() + RUN_TIMEOUT
            while victim is None and time.monotonic() < deadline and scan.poll() is None:
                done = len(ledger.read_text().splitlines()) - 1 if ledger.exists() else 0
                busy = [w for w, keys in client.processing().items() if keys]
                if done >= 1 and busy:
                    victim = busy[0]
                    os.kill(pids[victim], signal.SIGKILL)
                time.sleep(0.05)
            assert victim is not None, "the scan finished before a worker could be killed mid-run"
            stdout, stderr = scan.communicate(timeout=RUN_TIMEOUT)
        finally:
            if scan.poll() is None:
                scan.kill()
    assert scan.returncode == 0, stderr.decode()
    rows = list(csv.DictReader(open(out, encoding="utf-8")))
    assert Counter(r["path"] for r in rows) == Counter(str(folder / f"{i:03d}.png") for i in range(160))
    assert out.read_bytes() == local.read_bytes()
    assert [json.loads(x)["shard"] for x in ledger.read_text().splitlines()[1:]] == list(range(20))


def test_a_worker_that_cannot_see_the_files_is_named(cluster, tiny_model_path):
    address, _ = cluster
    from cxr.runtime.modelinfo import sha256_file

    job = ShardJob(model=ModelSpec(str(tiny_model_path), None, sha256_file(tiny_model_path), "cpu"), batch_size=4,
                   triage=None)
    with distributed.Client(address, timeout=30) as client:
        fut = client.submit(scan_shard, job, [Entry("/nonexistent-share/xr/0001.png"),
                                              Entry("/nonexistent-share/xr/0002.png")], pure=False)
        with pytest.raises(WorkerCannotRead, match="cannot read /nonexistent-share/xr/0001.png"):
            fut.result(timeout=RUN_TIMEOUT)
        wrong = ShardJob(model=ModelSpec(str(tiny_model_path), None, "0" * 64, "cpu"), batch_size=4, triage=None)
        fut = client.submit(scan_shard, wrong, [Entry(str(tiny_model_path))], pure=False)
        with pytest.raises(Exception, match="different model"):
            fut.result(timeout=RUN_TIMEOUT)


def test_review_page_and_heatmaps_as_a_local_scan(tmp_path, cluster, archive):
    """The workers draw heatmaps and thumbnails into the (shared) output folders; the page is the
    local scan's: the same rows in the same order, the same file names."""
    from tiny_cam_model import build_tiny_cam_model

    address, _ = cluster
    cam = build_tiny_cam_model(tmp_path / "cam.onnx")
    loc, cl = tmp_path / "loc", tmp_path / "cl"
    common = ("scan", archive / "good", archive / "bad", "--model", cam)
    r1 = cxr(*common, "-o", tmp_path / "a.csv", "--html", loc / "page.html", "--heatmaps", loc / "maps")
    r2 = cxr(*common, "-o", tmp_path / "b.csv", "--html", cl / "page.html", "--heatmaps", cl / "maps",
             "--scheduler", address, "--shard-size", 3)
    assert r2.returncode == r1.returncode, r2.stderr.decode()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    for sub in ("page_files", "maps"):
        names = sorted(os.listdir(loc / sub))
        assert names and sorted(os.listdir(cl / sub)) == names
    assert b"review page:" in r2.stderr and b"drawn by the workers" in r2.stderr

    def rows(page):
        text = page.read_text(encoding="utf-8")
        start = text.index(">", text.index('<script type="application/json"')) + 1
        return json.loads(text[start:text.index("</script>", start)])["rows"]

    assert rows(cl / "page.html") == rows(loc / "page.html")


def test_ctrl_c_keeps_finished_shards_and_resume_completes(tmp_path, cluster, tiny_model_path):
    address, _ = cluster
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(shaded(1200, 1200, 60)).save(folder / "000.png")
    for i in range(1, 120):
        shutil.copy(folder / "000.png", folder / f"{i:03d}.png")
    local = local_scan(tmp_path, tiny_model_path, [folder])
    out = tmp_path / "c.csv"
    ledger = Path(str(out) + ".shards.jsonl")
    args = ["scan", folder, "--model", tiny_model_path, "-o", out, "--scheduler", address, "--shard-size", 6]
    scan = subprocess.Popen([sys.executable, "-m", "cxr.runtime.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while scan.poll() is None and time.monotonic() < deadline:
            if ledger.exists() and len(ledger.read_text().splitlines()) >= 3:
                scan.send_signal(signal.SIGINT)
                break
            time.sleep(0.05)
        _, stderr = scan.communicate(timeout=RUN_TIMEOUT)
    finally:
        if scan.poll() is None:
            scan.kill()
    assert scan.returncode == 130, stderr.decode()
    assert b"scan interrupted" in stderr
    written = out.read_bytes()
    ends = [json.loads(x)["end"] for x in ledger.read_text().splitlines()[1:]]
    assert 2 <= len(ends) < 20 and len(written) == ends[-1]  # every finished shard, no partial one
    assert local.read_bytes().startswith(written)
    r = cxr(*args, "--resume")
    assert r.returncode == 0, r.stderr.decode()
    assert out.read_bytes() == local.read_bytes()


def test_usage_errors(tmp_path, tiny_model_path, archive):
    r = cxr("scan", archive / "many", "--model", tiny_model_path, "--resume")
    assert r.returncode == 2 and b"give --scheduler" in r.stderr
    r = cxr("scan", archive / "many", "--model", tiny_model_path, "--scheduler", "local:1", "--resume")
    assert r.returncode == 2 and b"--resume needs --output" in r.stderr
    r = cxr("scan", archive / "many", "--model", tiny_model_path, "--scheduler", "tcp://127.0.0.1:9")
    assert r.returncode == 2 and b"cannot reach the Dask scheduler" in r.stderr


def test_missing_extra_names_it_and_help_stays_light(tmp_path, tiny_model_path, archive):
    code = ("import sys; sys.modules['distributed'] = None\n"
            "from cxr.runtime.cli import main\n"
            f"main(['scan', {str(archive / 'many')!r}, '--model', {str(tiny_model_path)!r}, '--scheduler', 'local:1'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=RUN_TIMEOUT)
    assert r.returncode == 2 and b'pip install "cxr-infer[cluster]"' in r.stderr, r.stderr.decode()
    code = ("import sys\nfrom cxr.runtime.cli import main\n"
            "try:\n    main(['scan', '--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in ('dask', 'distributed') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=RUN_TIMEOUT)
    assert r.stdout.strip().endswith(b"[]") and b"--scheduler" in r.stdout
