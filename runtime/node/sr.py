"""The result as a DICOM Structured Report: a TID 1500 measurement report in the film's study.

Built with highdicom (Comprehensive SR IOD). One imaging-measurement group (TID 1501) references
the film and carries, as the rows a viewer lists:

- qualitative evaluations: ``Triage`` (refer / routine, when the model has an operating point),
  ``Finding`` (the class; absent when the prediction is withheld), ``Input check`` (the verdict);
- measurements: one ``Probability of <class>`` per class, unitless (UCUM ``1``), 0..1;
- the algorithm identification (TID 4019): model name, version and the model file's sha256;
- a withheld film or one that could not be read gets a text row saying why instead of a finding.

The observer is the device ``cxr-infer``; the series description, which viewers show beside
the series, says ``research use, not for diagnosis``. Codes without a standard one use the
private coding scheme ``99CXR`` (docs/dicom-node.md lists them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .. import __version__

SERIES_DESCRIPTION = "AI triage (cxr-infer): research use, not for diagnosis"
MANUFACTURER = "cxr-infer"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SCHEME = "99CXR"

# Standard codes where a class is one SNOMED CT concept; any other class (Lung_Opacity, the dataset's
# mix of findings, too) gets a 99CXR code.
KNOWN_CLASSES = {
    "covid": ("840539006", "SCT", "COVID-19"),
    "normal": ("17621005", "SCT", "Normal"),
    "viral pneumonia": ("75570004", "SCT", "Viral pneumonia"),
}


@dataclass(frozen=True)
class Algorithm:
    """Who made the result: goes into the SR's algorithm identification and observer context."""

    name: str       # e.g. the model file's name
    version: str    # model precision and cxr-infer version
    sha256: str     # of the model file: part of every derived UID
    arch: str = "unknown"


def _code(value: str, meaning: str, scheme: str = SCHEME):
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning[:64])


def class_code(name: str):
    known = KNOWN_CLASSES.get(name.strip().lower().replace("_", " "))
    if known:
        return _code(known[0], known[2], known[1])
    return _code("C" + hashlib.sha256(name.encode()).hexdigest()[:12].upper(), name)


def probability_code(name: str):
    return _code("P" + hashlib.sha256(name.encode()).hexdigest()[:12].upper(), f"Probability of {name}")


TRIAGE = ("TRIAGE", "Triage")
TRIAGE_VALUES = {"refer": ("REFER", "Refer for review"), "routine": ("ROUTINE", "Routine")}
INPUT_CHECK = ("INPUTCHECK", "Input check")
QC_MEANINGS = {"ok": "Like the training X-rays", "unfamiliar": "Unlike the training X-rays",
               "not_chest_xray": "Not a chest X-ray", "not_frontal": "Not a frontal view",
               "misoriented": "Misoriented", "unchecked": "Not checked (model without input check)"}
WITHHELD = ("WITHHELD", "Diagnosis withheld")
NOT_CLASSIFIED = ("NOTCLASSIFIED", "Not classified")


def build_sr(film, result, classes: list[str], algorithm: Algorithm, uids: dict[str, str]):
    """A highdicom ComprehensiveSR for ``result`` (an engine ScanResult) about ``film`` (its header)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids["device"], name="cxr-infer", manufacturer_name=MANUFACTURER,
        model_name=algorithm.arch[:64], serial_number=algorithm.sha256[:16])
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                                      observer_identifying_attributes=device))
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name[:64], version=algorithm.version[:64],
        parameters=[f"model sha256 {algorithm.sha256}"])
    pred = result.prediction
    evaluations, measurements, notes = [], [], []
    if pred is not None:
        if pred.triage in TRIAGE_VALUES:
            evaluations.append(hd.sr.QualitativeEvaluation(_code(*TRIAGE), _code(*TRIAGE_VALUES[pred.triage])))
        if pred.diagnosis_withheld:
            notes.append((WITHHELD, pred.qc_detail or f"the input check says {pred.qc}"))
        else:
            evaluations.append(hd.sr.QualitativeEvaluation(codes.DCM.Finding, class_code(pred.label)))
        evaluations.append(hd.sr.QualitativeEvaluation(
            _code(*INPUT_CHECK), _code(pred.qc.upper(), QC_MEANINGS.get(pred.qc, pred.qc))))
        measurements = [hd.sr.Measurement(name=probability_code(c), value=round(float(pred.probabilities[c]), 6),
                                          unit=_code("1", "no units", "UCUM"), algorithm_id=algorithm_id)
                        for c in classes]
    else:
        notes.append((NOT_CLASSIFIED, result.error or "unknown error"))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids["tracking"], identifier="cxr-infer chest film"),
        algorithm_id=algorithm_id,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(film)],
        measurements=measurements or None, qualitative_evaluations=evaluations or None)
    for concept, text in notes:  # TID 1501 is extensible: the reason, in words, for every viewer
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=_code(*concept), value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=_code("399208008", "Plain chest X-ray", "SCT"),
        imaging_measurements=[group])
    sr = hd.sr.ComprehensiveSR(
        evidence=[film], content=report[0], series_instance_uid=uids["sr_series"], series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids["sr"], instance_number=_instance_number(film), manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.SoftwareVersions = f"cxr-infer {__version__}"
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme():
    """Declares the private coding scheme 99CXR (PS3.3 C.12.1.1.3.1), so a reader knows whose it is."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "cxr-infer result codes"
    item.CodingSchemeResponsibleOrganization = "cxr-infer (docs/dicom-node.md)"
    return item


def _instance_number(film) -> int:
    try:
        n = int(film.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        n = 1
    return n if 0 < n < 2 ** 31 else 1
