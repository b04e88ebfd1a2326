"""The DICOM node (``cxr-infer listen``): a transport around the scan engine, in a room of its own.

A modality or PACS sends films by C-STORE; each is written to the state folder before it is
acknowledged, classified by the same engine as ``cxr-infer scan`` and answered with a TID 1500
Structured Report (and, with ``--heatmap``, a Secondary Capture) sent by C-STORE into the film's
own study. pynetdicom and highdicom are the ``dicom`` extra: nothing here is imported by the
plain runtime, and the commands say which extra to install when they are missing.

Modules: ``intake`` (what a received dataset must be before it is accepted), ``uids`` (UIDs
derived from what was received), ``sr`` and ``capture`` (the result objects), ``state`` (the
state folder: durable inbox, outbox, ledger, CSV), ``sender`` (C-STORE with retries),
``server`` (the association handlers and the worker), ``commands`` (the click commands).
"""

EXTRA_HINT = 'the DICOM node needs pynetdicom and highdicom: pip install "cxr-infer[dicom]"'


def require_extra() -> None:
    """Raise ImportError naming the extra when pynetdicom or highdicom is missing."""
    missing = []
    for name in ("pydicom", "pynetdicom", "highdicom"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed; {EXTRA_HINT}")
