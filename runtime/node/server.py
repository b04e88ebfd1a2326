"""The node: association handlers that take films in, and the worker that classifies them.

A C-STORE is answered only after the film is fsynced into ``incoming/`` (or refused with the
status ``intake`` chose); classification runs later in one worker thread, through the scan
engine (``engine.iter_scan``: the same input check, DICOM header rules, triage and calibration
as ``cxr-infer scan``), so a slow model never holds a modality's association open. The worker
writes each result to ``outbox/`` before it records the film as done, and removes the film
last: a kill at any point leaves either the film (done again on restart, with the same UIDs)
or its finished record.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading

from ..terminal_text import printable
from . import intake
from .sr import Algorithm, build_sr
from .state import INCOMING, OUTBOX, REJECTED, StateFolder, film_key
from .uids import result_uids

log = logging.getLogger("cxr.node")

FILM_CLASSES = tuple(intake.FILM_SOP_CLASSES)


def _text(value) -> str:
    """A UID or AE title from outside, safe for one log line."""
    return printable(str(value))[:100]


def transfer_syntaxes() -> list[str]:
    """Every transfer syntax pynetdicom knows, the ones pydicom can decode first: an acceptor's
    order decides, so a modality that offers both gets an uncompressed or decodable one, and a
    film in an undecodable one gets a status that says so rather than a bare rejected context."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    def decodable(ts: str) -> bool:
        if not UID(ts).is_compressed:
            return True
        try:
            return get_decoder(UID(ts)).is_available
        except (NotImplementedError, ValueError):
            return False

    return sorted(ALL_TRANSFER_SYNTAXES, key=lambda ts: (UID(ts).is_compressed, not decodable(ts)))


class Node:
    """State, model and threads of one ``cxr-infer listen``."""

    def __init__(self, state: StateFolder, model, policy, rowlog, algorithm: Algorithm, *, aet: str,
                 allow: tuple[str, ...] = (), heatmap: bool = False, sender=None, batch_size: int = 16):
        self.state, self.model, self.policy, self.rowlog, self.algorithm = state, model, policy, rowlog, algorithm
        self.aet, self.allow, self.heatmap, self.sender, self.batch_size = aet, allow, heatmap, sender, batch_size
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.worker = threading.Thread(target=self._work, name="cxr-worker", daemon=True)
        self.server = None

    # -- receiving ---------------------------------------------------------------------------

    def application_entity(self):
        from pynetdicom import AE
        from pynetdicom.presentation import AllStoragePresentationContexts
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.aet)
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(Verification)
        # every storage class is accepted, so a study routed here whole gets a clear refusal for
        # its reports and photos (0x0122) instead of an association the sender cannot explain
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        if self.allow:
            ae.require_calling_aet = list(self.allow)
        ae.maximum_associations = 8
        return ae

    def handlers(self):
        from pynetdicom import evt

        return [(evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store),
                (evt.EVT_REJECTED, self.on_rejected)]

    def on_rejected(self, event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        why = ("calling AE title not in --allow (" + ", ".join(self.allow) + ")"
               if self.allow and calling not in self.allow else "too many associations at once, or a bad request")
        log.warning("refused association from %s at %s: %s", _text(calling), peer, why)

    def on_echo(self, event) -> int:
        log.info("C-ECHO from %s", _text(event.assoc.requestor.ae_title))
        return 0x0000

    def on_store(self, event):
        calling = _text(event.assoc.requestor.ae_title)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            encoded = event.encoded_dataset()
            refusal = intake.check_film(ds, event.context.transfer_syntax, len(encoded))
            sop = str(ds.get("SOPInstanceUID", "") or "")
        except Exception as exc:  # pydicom raises many types for a malformed dataset
            refusal = intake.Refusal(intake.CANNOT_DECODE, f"malformed dataset: {exc or exc.__class__.__name__}")
            sop = "?"
        if refusal is not None:
            log.warning("refused film %s from %s: %s", _text(sop), calling, refusal)
            return self._status(refusal.status, refusal.reason)
        key = film_key(sop)
        if key in self.rowlog.done:
            log.info("film %s from %s already classified (result %s); not classified again", _text(sop), calling,
                     self.rowlog.done[key].get("sr"))
            return 0x0000
        name = key + ".dcm"
        if os.path.exists(self.state.path(INCOMING, name)):
            log.info("film %s from %s already queued", _text(sop), calling)
            return 0x0000
        try:
            self.state.write_atomic(INCOMING, name, data=encoded)
        except OSError as exc:
            log.error("cannot store film %s from %s: %s", _text(sop), calling, exc)
            return self._status(intake.OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        self.wake.set()
        log.info("received film %s from %s; %d waiting to be classified", _text(sop), calling,
                 len(self.state.listing(INCOMING, ".dcm")))
        return 0x0000

    @staticmethod
    def _status(code: int, comment: str):
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.Status = code
        ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
        return ds

    # -- classifying -------------------------------------------------------------------------

    def _work(self) -> None:
        while not self.stop.is_set():
            pending = []
            for path in self.state.listing(INCOMING, ".dcm"):
                if os.path.basename(path)[:-4] in self.rowlog.done:
                    os.unlink(path)  # done, but killed before the film was removed
                else:
                    pending.append(path)
            if not pending:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            try:
                self.classify(pending[: 4 * self.batch_size])
            except Exception:  # the worker must outlive any one film's surprise
                log.exception("worker error; the films stay queued and are tried again")
                self.stop.wait(5.0)

    def classify(self, paths: list[str]) -> None:
        from ..engine import iter_scan
        from ..scan_outputs import PREVIEW_SIDE

        results = iter_scan(self.model, paths, batch_size=self.batch_size, workers=1, triage=self.policy,
                            heatmaps=self.heatmap, previews=PREVIEW_SIDE if self.heatmap else 0)
        try:
            for result in results:
                self._finish(result)
                if self.stop.is_set():
                    break
        finally:
            results.close()

    def _finish(self, result) -> None:
        import pydicom

        path = result.path
        key = os.path.basename(path)[:-4]
        try:
            film = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            sop, study = str(film.SOPInstanceUID), str(film.StudyInstanceUID)
        except Exception as exc:  # was read on receipt; a damaged disk must not stall the queue
            log.error("cannot re-read queued film %s: %s; moved to %s/", key, exc, REJECTED)
            os.replace(path, self.state.path(REJECTED, key + ".film.dcm"))
            self.rowlog.append(key, dataclasses.replace(result, path=key, prediction=None,
                                                        error=f"queued film unreadable: {exc}"), sr=None)
            return
        uids = result_uids(sop, study, self.algorithm.sha256)
        row = dataclasses.replace(result, path=sop)
        try:
            sr = build_sr(film, row, self.model.classes, self.algorithm, uids)
            self.state.write_atomic(OUTBOX, key + ".sr.dcm", dataset=sr)
            sc_uid = None
            if self.heatmap:
                from .capture import build_capture

                sc = build_capture(film, result, self.model.classes, self.model.info.preprocess, uids)
                if sc is not None:
                    self.state.write_atomic(OUTBOX, key + ".sc.dcm", dataset=sc)
                    sc_uid = uids["sc"]
        except OSError:
            raise  # a full disk: keep the film queued
        except Exception as exc:  # a header highdicom refuses: say so in the row, keep the film
            log.error("cannot build the result for film %s: %s; film kept in %s/", _text(sop), exc, REJECTED)
            os.replace(path, self.state.path(REJECTED, key + ".film.dcm"))
            self.rowlog.append(key, dataclasses.replace(row, prediction=None, error=f"cannot build the SR: {exc}"),
                               sop=sop, study=study, sr=None)
            return
        self.rowlog.append(key, row, sop=sop, study=study, sr=uids["sr"], sc=sc_uid)
        os.unlink(path)
        if self.sender is not None:
            self.sender.wake.set()
        what = (f"{result.prediction.label if not result.prediction.diagnosis_withheld else 'withheld'} "
                f"(qc {result.prediction.qc}, triage {result.prediction.triage or '-'})"
                if result.ok else f"error: {result.error}")
        log.info("classified film %s: %s; SR %s queued; %d waiting", _text(sop), what, uids["sr"],
                 len(self.state.listing(INCOMING, ".dcm")))

    # -- running -----------------------------------------------------------------------------

    def start(self, bind: str, port: int) -> None:
        ae = self.application_entity()
        self.server = ae.start_server((bind, port), block=False, evt_handlers=self.handlers())
        self.worker.start()
        if self.sender is not None:
            self.sender.start()

    def shutdown(self) -> None:
        """Stop taking associations, let the worker finish its film and the sender its send."""
        self.stop.set()
        self.wake.set()
        if self.server is not None:
            self.server.shutdown()
        self.worker.join(timeout=60)
        if self.sender is not None:
            self.sender.wake.set()
            self.sender.join(timeout=60)
