"""UIDs of what the node sends, derived from what it received.

Each result object's UID is a pure function of the film's SOP Instance UID (or, for a series,
its Study Instance UID), the model file's sha256 and the object kind: a name-based (version 5)
UUID of those, written under the ``2.25`` root as PS3.5 B.2 describes. A film sent twice, a
restart after a crash or a retried send therefore produce the same SOP Instance UID, and the
PACS stores one object, never two. A different model (another sha256) makes a different result.
(pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and returns a random UUID,
so it cannot serve here.)
"""

from __future__ import annotations

import uuid

SCHEME = "cxr-infer/uid/1"  # bump if the derivation ever changes, so old and new never collide
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, SCHEME)


def derived_uid(kind: str, source_uid: str, model_sha256: str) -> str:
    """``2.25.<decimal of a 128-bit UUID>`` from (kind, source UID, model sha256); at most 44 characters."""
    name = "\n".join((kind, str(source_uid), model_sha256))
    return f"2.25.{uuid.uuid5(NAMESPACE, name).int}"


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
