"""UIDs of what the node sends, derived from what it received.

Each result object's UID is a pure function of the film's SOP Instance UID (or, for a series,
its Study Instance UID), the model file's sha256 and the object kind, hashed under the ``2.25``
root (pydicom's ``generate_uid`` with fixed entropy sources, PS3.5 B.2). A film sent twice, a
restart after a crash or a retried send therefore produce the same SOP Instance UID, and the
PACS stores one object, never two. A different model (another sha256) makes a different result.
"""

from __future__ import annotations

SCHEME = "cxr-infer/uid/1"  # bump if the derivation ever changes, so old and new never collide


def derived_uid(kind: str, source_uid: str, model_sha256: str) -> str:
    """``2.25.<decimal>`` from (kind, source UID, model sha256); at most 64 characters."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=None, entropy_srcs=[SCHEME, kind, str(source_uid), model_sha256]))


def result_uids(film_sop_uid: str, study_uid: str, model_sha256: str) -> dict[str, str]:
    """Every UID of one film's results: the SR and the heatmap capture, and their series (one
    series per study and model, so a study's results sit together)."""
    return {
        "sr": derived_uid("sr", film_sop_uid, model_sha256),
        "sr_series": derived_uid("sr-series", study_uid, model_sha256),
        "sc": derived_uid("sc", film_sop_uid, model_sha256),
        "sc_series": derived_uid("sc-series", study_uid, model_sha256),
        "device": derived_uid("device", "cxr-infer", model_sha256),
        "tracking": derived_uid("tracking", film_sop_uid, model_sha256),
    }
