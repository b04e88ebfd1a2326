"""The node's state folder: what it received, what it must still send, what it has done.

::

    STATE/
      lock               held (flock) by the running node: one node per folder
      incoming/KEY.dcm   films as received, fsynced before the C-STORE response
      outbox/KEY.sr.dcm  results waiting for the destination (and KEY.sc.dcm with --heatmap)
      rejected/          results the destination refused with a failure status (kept, not retried)
      tmp/               partial writes; renamed into place when complete, emptied at start
      results.csv        one row per film, the scan's columns; ``path`` is the film's SOP Instance UID
      ledger.jsonl       one line per finished film (rowlog.RowLog): its key, UIDs, calling AE
      status.json        the sender's last attempt, error and next retry (for --status)
      node.log           the log

KEY is the first 32 hex digits of the sha256 of the film's SOP Instance UID: every name in the
folder is made here, from hashes, so no UID -- whatever characters it holds -- picks a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

INCOMING, OUTBOX, REJECTED, TMP = "incoming", "outbox", "rejected", "tmp"


def film_key(sop_instance_uid: str) -> str:
    return hashlib.sha256(str(sop_instance_uid).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateFolder:
    """Paths and durable writes inside one state folder."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        for sub in (INCOMING, OUTBOX, REJECTED, TMP):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.results_csv = os.path.join(self.root, "results.csv")
        self.ledger = os.path.join(self.root, "ledger.jsonl")
        self.status_json = os.path.join(self.root, "status.json")
        self.log_file = os.path.join(self.root, "node.log")
        self._lock_fd: int | None = None

    def path(self, sub: str, name: str) -> str:
        if os.sep in name or name.startswith(".") or (os.altsep and os.altsep in name):
            raise ValueError(f"not a plain state file name: {name!r}")
        return os.path.join(self.root, sub, name)

    def lock(self) -> None:
        """Hold the folder for this process; OSError (BlockingIOError) when another node has it."""
        import fcntl

        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def is_locked(self) -> bool:
        """Whether a running node holds the folder (for --status)."""
        import fcntl

        try:
            fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def clear_tmp(self) -> None:
        for name in os.listdir(os.path.join(self.root, TMP)):
            try:
                os.unlink(os.path.join(self.root, TMP, name))
            except OSError:
                pass

    def write_atomic(self, sub: str, name: str, data: "bytes | None" = None, dataset=None) -> str:
        """Write bytes (or a pydicom dataset) to ``sub/name``: into tmp/, fsync, rename, fsync the
        folder. After it returns the file survives a crash; before, only a tmp/ leftover can."""
        target = self.path(sub, name)
        tmp = os.path.join(self.root, TMP, f"{name}.{os.getpid()}.{time.monotonic_ns()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            with os.fdopen(fd, "wb") as fh:
                if dataset is not None:
                    dataset.save_as(fh, enforce_file_format=True)
                else:
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        fsync_dir(os.path.dirname(target))
        return target

    def listing(self, sub: str, suffix: str = "") -> list[str]:
        """Plain files of ``sub``, oldest first (the order they arrived in)."""
        folder = os.path.join(self.root, sub)
        entries = []
        for name in os.listdir(folder):
            if name.endswith(suffix) and not name.startswith("."):
                try:
                    entries.append((os.stat(os.path.join(folder, name)).st_mtime_ns, name))
                except FileNotFoundError:
                    continue
        return [os.path.join(folder, n) for _, n in sorted(entries)]

    def write_status(self, status: dict[str, Any]) -> None:
        self.write_atomic(".", "status.json", json.dumps(status, indent=2).encode())

    def read_status(self) -> dict[str, Any]:
        try:
            with open(self.status_json, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {}
