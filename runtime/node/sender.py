"""Sends the outbox to the destination by C-STORE, and keeps trying until it answers.

A result leaves the outbox only when the destination has answered its C-STORE: success or a
warning deletes it, a failure status moves it to ``rejected/`` (retrying a refusal would only
repeat it; the log and ``--status`` show it). No connection, a rejected or aborted association
or a timeout leave it where it is, and the next attempt waits twice as long (1 s up to 60 s).
The derived UIDs make a repeated send harmless: the PACS already holds that SOP Instance.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

from .state import OUTBOX, REJECTED, StateFolder

log = logging.getLogger("cxr.node")

BACKOFF_FIRST_S, BACKOFF_MAX_S = 1.0, 60.0
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"      # Secondary Capture
WARNINGS = (0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Destination:
    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AET@HOST:PORT``; ValueError saying what is wrong."""
        aet, at, rest = text.partition("@")
        host, colon, port = rest.rpartition(":")
        if not at or not colon or not aet or not host or not port.isdigit():
            raise ValueError(f"{text!r} is not AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
        if len(aet) > 16:
            raise ValueError(f"AE title {aet!r} is longer than 16 characters")
        return cls(aet, host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.aet}@{self.host}:{self.port}"


class Sender(threading.Thread):
    """The one thread that talks to the destination."""

    def __init__(self, state: StateFolder, dest: Destination, our_aet: str, stop: threading.Event):
        super().__init__(name="cxr-sender", daemon=True)
        self.state, self.dest, self.our_aet, self.stop = state, dest, our_aet, stop
        self.wake = threading.Event()
        self.backoff = 0.0
        self.sent = 0
        self.last_error: str | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            queued = self.state.listing(OUTBOX, ".dcm")
            if queued:
                ok = self._send_all(queued)
                if ok:
                    self.backoff = 0.0
                    continue
                self.backoff = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self.backoff * 2))
                left = len(self.state.listing(OUTBOX, ".dcm"))
                log.warning("send to %s failed: %s; %d result(s) queued, retry in %.0f s",
                            self.dest, self.last_error, left, self.backoff)
                self._status(left, retry_in=self.backoff)
                self.stop.wait(self.backoff)
            else:
                self.wake.wait(1.0)
            self.wake.clear()

    def _status(self, queued: int, retry_in: float | None = None) -> None:
        try:
            self.state.write_status({"destination": str(self.dest), "queued": queued, "sent": self.sent,
                                     "last_error": self.last_error, "retry_in_s": retry_in,
                                     "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        except OSError as exc:
            log.error("cannot write %s: %s", self.state.status_json, exc)

    def _send_all(self, paths: list[str]) -> bool:
        """Send what is queued over one association; False when the destination did not answer."""
        from pynetdicom import AE
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        ae = AE(ae_title=self.our_aet)
        for sop_class in (SR_CLASS, SC_CLASS):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        try:
            assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.aet)
        except Exception as exc:  # e.g. a host name that does not resolve
            self.last_error = f"cannot connect: {exc}"
            return False
        if not assoc.is_established:
            self.last_error = ("association rejected" if assoc.is_rejected else
                               "association aborted" if assoc.is_aborted else "no answer (connection refused?)")
            return False
        try:
            for path in paths:
                if self.stop.is_set():
                    break
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                name = os.path.basename(path)
                if code is None:
                    self.last_error = "no C-STORE response (connection lost or timed out)"
                    return False
                if code == 0x0000 or code in WARNINGS:
                    os.unlink(path)
                    self.sent += 1
                    left = len(self.state.listing(OUTBOX, ".dcm"))
                    log.info("sent %s to %s (status 0x%04X); %d queued", name, self.dest, code, left)
                else:
                    comment = getattr(status, "ErrorComment", "") or ""
                    os.replace(path, self.state.path(REJECTED, name))
                    log.error("%s refused %s with status 0x%04X %s; moved to %s", self.dest, name, code,
                              comment, REJECTED + "/")
            self.last_error = None
            self._status(len(self.state.listing(OUTBOX, ".dcm")))
            return True
        finally:
            if assoc.is_established:
                assoc.release()
