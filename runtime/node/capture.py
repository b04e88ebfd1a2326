"""``--heatmap``: the activation map burnt into a Secondary Capture in the film's study.

The picture is the one ``cxr-infer scan --heatmaps`` writes (``heatmap.render_heatmap``), its
caption saying ``research use, not for diagnosis``; the series description says it too, and
BurnedInAnnotation is YES because the label is in the pixels. Withheld and unread films get no
capture: there is no class whose evidence could be drawn.
"""

from __future__ import annotations

import numpy as np

from ..heatmap import render_heatmap
from .sr import MANUFACTURER, SC_SERIES_NUMBER, SERIES_DESCRIPTION, _instance_number

CAPTION = "research use, not for diagnosis"


def build_capture(film, result, classes: list[str], pp, uids: dict[str, str]):
    """A highdicom SCImage of the heatmap figure, or None when the result has nothing to draw."""
    pred = result.prediction
    if pred is None or pred.diagnosis_withheld or result.heatmap is None or result.preview is None:
        return None
    import highdicom as hd

    k = classes.index(pred.label)
    figure = render_heatmap(result.preview, result.heatmap[k], pp, pred.label, pred.confidence,
                            caption=f"where the evidence for {pred.label} is strongest; {CAPTION}")
    pixels = np.ascontiguousarray(np.asarray(figure.convert("RGB"), dtype=np.uint8))
    sc = hd.sc.SCImage.from_ref_dataset(
        film, pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        series_instance_uid=uids["sc_series"], series_number=SC_SERIES_NUMBER, sop_instance_uid=uids["sc"],
        instance_number=_instance_number(film), manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"), transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = None  # Type 2C: a chest is not a paired part; empty satisfies dciodvfy's condition
    sc.ImageComments = f"{pred.label} {100 * pred.confidence:.1f}%: {CAPTION}"
    return sc
