"""Real DICOM components for the node's tests: Debian's Orthanc as the PACS, started from a
config file on loopback ports, and dcmtk's storescu / echoscu as the modality. Each helper
skips the test, saying why, when its binary is missing (``.ci/run`` installs them)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

INSTALL = "apt-get install orthanc dcmtk dicom3tools"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dcmtk(name: str) -> str:
    """dcmtk's ``name`` (pynetdicom installs Python apps of the same names into the venv: skip those)."""
    for folder in ["/usr/bin", "/usr/local/bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            if "dcmtk" in out.lower():
                return path
    pytest.skip(f"dcmtk's {name} not found ({INSTALL})")


def dciodvfy() -> str:
    path = shutil.which("dciodvfy")
    if not path:
        pytest.skip(f"dicom3tools' dciodvfy not found ({INSTALL})")
    return path


def wait_for(what: str, check, timeout: float = 60.0, interval: float = 0.2):
    """Poll ``check()`` until it returns something truthy; fail saying what never happened."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"gave up after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Orthanc:
    """One Orthanc process with its own config, storage and loopback ports."""

    def __init__(self, root: Path, aet: str = "PACS", dicom_port: int | None = None, *, modalities: dict | None = None,
                 lua: str | None = None, **options):
        """``modalities``: Orthanc's DicomModalities; ``lua``: a Lua script's text, loaded as LuaScripts;
        ``options``: more orthanc.json settings, overriding the defaults."""
        binary = shutil.which("Orthanc") or shutil.which("orthanc")
        if not binary:
            pytest.skip(f"Orthanc not found ({INSTALL})")
        self.aet, self.root = aet, root
        self.dicom_port, self.http_port = dicom_port or free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxr-test-pacs", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
            "DicomAet": aet, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True, "Plugins": [], "DicomModalities": modalities or {}, "StableAge": 1,
            "OverwriteInstances": False, **options,
        }
        if lua is not None:
            (root / "scripts.lua").write_text(lua)
            config["LuaScripts"] = [str(root / "scripts.lua")]
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config, indent=2))
        self.log = open(root / "orthanc.log", "wb")
        self.proc = subprocess.Popen([binary, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("Orthanc's REST API", self._alive, timeout=60)

    def _alive(self):
        if self.proc.poll() is not None:
            pytest.fail(f"Orthanc exited with {self.proc.returncode}; see {self.root / 'orthanc.log'}")
        try:
            return self.get("/system")
        except (urllib.error.URLError, ConnectionError, OSError):
            return None

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body, timeout: float = 10) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def upload(self, path: Path) -> str:
        """Store a DICOM file over the REST API (``POST /instances``); returns its Orthanc ID."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/instances", data=Path(path).read_bytes(),
                                     headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["ID"]

    def instances(self, modality: str | None = None, study_uid: str | None = None) -> list[dict]:
        """Instances (with their main tags) in Orthanc, optionally by series modality and study."""
        query = {}
        if modality:
            query["Modality"] = modality
        if study_uid:
            query["StudyInstanceUID"] = study_uid
        return self.post("/tools/find", {"Level": "Instance", "Query": query, "Expand": True})

    def file(self, orthanc_id: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/instances/{orthanc_id}/file",
                                    timeout=30) as r:
            return r.read()

    @property
    def address(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
