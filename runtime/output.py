"""Result writers (csv, jsonl, json, table), the summary and the progress line.

Every writer flushes after each record, so a scan that is interrupted -- Ctrl-C, a killed
process, a full disk later on -- leaves every finished row on disk. Paths that are not valid
UTF-8 (Python carries them as surrogate escapes) are shown with backslash escapes instead of
crashing the writer.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import sys
import time
from typing import IO, Any

from .csv_formula import guard_cell
from .engine import ScanResult, ScanStats
from .inputcheck import FLAGGED, NO_DIAGNOSIS, OK, QC_VALUES, UNCHECKED, UNFAMILIAR
from .terminal_text import printable

FORMATS = ("table", "csv", "jsonl", "json")
PROB_DECIMALS = 6


def display_path(path: str) -> str:
    """A printable form of ``path``: undecodable bytes become ``\\xNN`` escapes."""
    try:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from surrogateescape
        return path.encode("utf-8", "backslashreplace").decode("utf-8")


def columns(classes: list[str]) -> list[str]:
    return ["path", "prediction", "confidence", *[f"p_{c}" for c in classes], "status", "error", "qc", "qc_score",
            "triage"]


def result_record(result: ScanResult, classes: list[str]) -> dict[str, Any]:
    """One output record; probabilities rounded to 6 decimals, empty (None) on error rows.

    A row the input check flags (``not_chest_xray``, ``not_frontal``; ``unfamiliar`` unless the
    scan shows those) shows no prediction and no confidence (it must not read as a diagnosis);
    its probabilities stay, as scores. The reason
    in words (``qc_detail``) is in the table and the Python API.
    """
    pred = result.prediction
    shown = pred is not None and not pred.diagnosis_withheld
    rec: dict[str, Any] = {
        "path": display_path(result.path),
        "prediction": pred.label if shown else None,
        "confidence": round(pred.confidence, PROB_DECIMALS) if shown else None,
    }
    for c in classes:
        rec[f"p_{c}"] = round(pred.probabilities[c], PROB_DECIMALS) if pred else None
    rec["status"] = result.status
    rec["error"] = result.error
    rec["qc"] = pred.qc if pred else None
    rec["qc_score"] = round(pred.qc_score, PROB_DECIMALS) if pred and pred.qc_score is not None else None
    rec["triage"] = result.triage  # refer/routine; None on errors and models without operating points
    return rec


class Writer:
    def __init__(self, stream: IO[str], classes: list[str]):
        self.stream = stream
        self.classes = classes
        self.columns = columns(classes)

    def write(self, result: ScanResult) -> None:
        self._write(result_record(result, self.classes))
        self.stream.flush()

    def _write(self, rec: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stream.flush()


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{PROB_DECIMALS}f}"
    if isinstance(v, numbers.Number):  # int, bool, numpy scalars: ours, not text from outside
        return str(v)
    return guard_cell(str(v))  # text from outside: never a spreadsheet formula


class CsvWriter(Writer):
    def __init__(self, stream, classes, header: bool = True):
        super().__init__(stream, classes)
        self._csv = csv.writer(stream, lineterminator="\n")
        # csv quotes a field holding the line terminator ("\n") but not a lone "\r", which
        # readers take as a line break: a row with a "\r" in a file name is quoted in full
        self._csv_quote_all = csv.writer(stream, lineterminator="\n", quoting=csv.QUOTE_ALL)
        if header:  # False: appending to a file that has it (watch, listen)
            self._csv.writerow([guard_cell(c) for c in self.columns])  # class names come from the model file
            stream.flush()

    def _write(self, rec):
        cells = [_csv_cell(rec[c]) for c in self.columns]
        (self._csv_quote_all if any("\r" in c for c in cells) else self._csv).writerow(cells)


def _finite(rec: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Infinity: a non-finite qc_score (an image the model could not place at
    all) is written as null; its qc says what happened."""
    v = rec.get("qc_score")
    if isinstance(v, float) and not math.isfinite(v):
        return {**rec, "qc_score": None}
    return rec


class JsonlWriter(Writer):
    def _write(self, rec):
        self.stream.write(json.dumps(_finite(rec), ensure_ascii=False) + "\n")


class JsonWriter(Writer):
    """A JSON array, streamed element by element; ``close`` ends it so the file parses."""

    def __init__(self, stream, classes):
        super().__init__(stream, classes)
        self._n = 0
        stream.write("[")

    def _write(self, rec):
        self.stream.write(("\n" if self._n == 0 else ",\n") + json.dumps(_finite(rec), ensure_ascii=False))
        self._n += 1

    def close(self):
        self.stream.write("\n]\n" if self._n else "]\n")
        super().close()


class TableWriter(Writer):
    """Aligned columns for people; the path goes last so long paths do not break alignment."""

    def __init__(self, stream, classes):
        super().__init__(stream, classes)
        self._w = max([len("prediction"), len("ERROR"), *map(len, classes)])
        self._pw = [max(len(f"p_{c}"), 6) for c in classes]
        head = [f"{'prediction':<{self._w}}", f"{'conf':>6}"]
        head += [f"{f'p_{c}':>{w}}" for c, w in zip(classes, self._pw)]
        self._qw = max(map(len, QC_VALUES))
        head += [f"{'qc':<{self._qw}}", f"{'qc_score':>8}"]
        head.append(f"{'triage':<7}")
        stream.write("  ".join(head + ["path"]) + "\n")
        stream.flush()

    def write(self, result: ScanResult) -> None:
        rec = result_record(result, self.classes)
        rec["qc_detail"] = result.prediction.qc_detail if result.prediction is not None else None
        self._write(rec)
        self.stream.flush()

    def _write(self, rec):
        if rec["status"] == "ok":
            shown = rec["prediction"] is not None
            cells = [f"{rec['prediction'] if shown else '-':<{self._w}}",
                     f"{rec['confidence']:>6.3f}" if shown else f"{'-':>6}"]
            cells += [f"{rec[f'p_{c}']:>{w}.3f}" for c, w in zip(self.classes, self._pw)]
            score = rec["qc_score"]
            cells += [f"{rec['qc']:<{self._qw}}", f"{score:>8.2f}" if score is not None else f"{'-':>8}"]
            cells.append(f"{rec['triage'] or '-':<7}")
            flagged = rec["qc"] in FLAGGED and rec.get("qc_detail")
            tail = rec["path"] + (f"  ({rec['qc_detail']})" if flagged else "")
            self.stream.write("  ".join(cells + [printable(tail)]) + "\n")
        else:
            cells = [f"{'ERROR':<{self._w}}", f"{'':>6}"] + [f"{'':>{w}}" for w in self._pw]
            cells += [f"{'':<{self._qw}}", f"{'':>8}", f"{'':<7}"]
            self.stream.write("  ".join(cells + [printable(f"{rec['path']}  ({rec['error']})")]) + "\n")


_WRITERS = {"csv": CsvWriter, "jsonl": JsonlWriter, "json": JsonWriter, "table": TableWriter}


def make_writer(fmt: str, stream: IO[str], classes: list[str]) -> Writer:
    try:
        return _WRITERS[fmt](stream, classes)
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}") from None


def format_for_output(output: str | None, stdout_is_tty: bool) -> str:
    """Default format: from --output's suffix (.csv/.jsonl/.json), else table on a terminal, else csv."""
    if output:
        for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv")):
            if output.lower().endswith(suffix):
                return fmt
        return "csv"
    return "table" if stdout_is_tty else "csv"


def format_summary(stats: ScanStats, classes: list[str]) -> str:
    """Counts per predicted class, errors and skipped (with reasons), for stderr."""
    head = "scan interrupted" if stats.interrupted else "scan finished"
    lines = [
        f"{head}: {stats.files} files in {stats.wall_s:.2f} s -- {stats.ok} classified, "
        f"{stats.errors} errors, {stats.skipped} skipped"
    ]
    w = max([len("skipped"), *map(len, classes)])
    for c in classes:
        lines.append(f"  {c:<{w}}  {stats.by_class.get(c, 0)}")
    lines.append(f"  {'errors':<{w}}  {stats.errors}")
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(stats.skip_reasons.items()))
    lines.append(f"  {'skipped':<{w}}  {stats.skipped}" + (f" ({reasons})" if reasons else ""))
    lines += format_qc_summary(stats)
    return "\n".join(lines)


def format_qc_summary(stats: ScanStats) -> list[str]:
    """The input check's verdicts over the classified rows, flagged reasons first."""
    if not stats.qc:
        return []
    order = [q for q in QC_VALUES if q in FLAGGED] + [OK, UNCHECKED]
    order += sorted(q for q in stats.qc if q not in order)
    counts = ", ".join(f"{stats.qc[q]} {q}" for q in order if stats.qc.get(q))
    lines = [f"  input check: {counts}"]
    if stats.withheld:
        unfamiliar_withheld = stats.withheld - sum(stats.qc.get(q, 0) for q in NO_DIAGNOSIS)
        lines.append(f"  {stats.withheld} flagged image(s) show no prediction"
                     + (f" (--show-unfamiliar shows it for the {unfamiliar_withheld} {UNFAMILIAR})"
                        if unfamiliar_withheld > 0 else ""))
    if stats.qc.get("unchecked"):
        lines.append("  unchecked: the model has no input check (exported before it); only DICOM-header and pixel "
                     "checks ran")
    return lines


def scan_summary_lines(stats: ScanStats, classes: list[str], policy, no_triage: bool) -> list[str]:
    """What every scan (local or cluster) prints on stderr when it ends: counts, triage, shift check."""
    from .triage import summary_line

    lines = [format_summary(stats, classes), summary_line(policy, stats.triage, no_triage)]
    if stats.shift is not None:
        lines.append(stats.shift.message())
    return lines


def summary_record(stats: ScanStats, classes: list[str], policy, no_triage: bool) -> dict[str, Any]:
    """The ``summary`` object of a scan's ``--report`` JSON (its ``shift`` object is ``shift_record``)."""
    point = None if policy is None else {
        "threshold": policy.threshold, "asked_sensitivity": policy.asked,
        "validation_sensitivity": policy.sensitivity, "validation_specificity": policy.specificity}
    return {"classified": stats.ok, "errors": stats.errors, "skipped": stats.skipped,
            "by_class": {c: stats.by_class.get(c, 0) for c in classes},
            "qc": dict(stats.qc), "withheld": stats.withheld,
            "skip_reasons": dict(stats.skip_reasons),
            "triage": {"counts": dict(stats.triage), "point": point, "unavailable": no_triage}}


def shift_record(stats: ScanStats) -> dict[str, Any] | None:
    return None if stats.shift is None else stats.shift.to_dict()


class Progress:
    """A one-line counter on stderr, redrawn at most 10 times a second; silent off a terminal."""

    def __init__(self, stats: ScanStats, stream: IO[str] | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.stats = stats
        self._last = 0.0
        self._drawn = False

    def update(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        s = self.stats
        rate = s.ok / s.wall_s if s.wall_s > 0 else 0.0
        self.stream.write(
            f"\r{s.files} files  {s.ok} ok  {s.errors} errors  {s.skipped} skipped  {rate:.1f} img/s "
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
