"""Result rows appended exactly once, across crashes: for the long-running ``watch`` and ``listen``.

Each row goes to the results file (CSV with the scan's columns, or JSON lines), which is flushed
and fsynced; then one line goes to a ledger beside it, holding the item's key and the results
file's size after the row. On start, the results file is cut back to the size the last ledger
line recorded: a row written just before a crash, whose ledger line never made it, is removed
and its item done again -- so every item has exactly one row, and the ledger says which are done.
A torn last ledger line (a kill during its write) is dropped the same way.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

from .csv_formula import guard_cell
from .output import CsvWriter, JsonlWriter, columns


class RowLog:
    """Appends rows to ``results_path`` and remembers, in ``ledger_path``, which keys are done."""

    def __init__(self, results_path: str, ledger_path: str, classes: list[str]):
        self.results_path = results_path
        self.ledger_path = ledger_path
        self.done: dict[str, dict[str, Any]] = {}
        end = self._read_ledger()
        fmt = "jsonl" if results_path.lower().endswith((".jsonl", ".ndjson")) else "csv"
        exists = os.path.exists(results_path) and os.path.getsize(results_path) > 0
        if exists and end is not None:
            with open(results_path, "r+b") as fh:  # drop rows written after the last ledger line
                fh.truncate(min(end, os.path.getsize(results_path)))
        elif exists:  # rows but no ledger: nothing recorded as done, start the file again
            os.truncate(results_path, 0)
            exists = False
        if exists and fmt == "csv":
            with open(results_path, newline="", encoding="utf-8", errors="replace") as fh:
                head = next(csv.reader(fh), [])
            if head != [guard_cell(c) for c in columns(classes)]:
                raise ValueError(f"{results_path} has other columns ({', '.join(head)}): rows of another model; "
                                 "use a new results file")
        self._stream = open(results_path, "a", encoding="utf-8", errors="backslashreplace", newline="")
        if fmt == "csv":
            self._writer = CsvWriter(self._stream, classes, header=not exists)
        else:
            self._writer = JsonlWriter(self._stream, classes)
        self._sync(self._stream)
        self._ledger = open(ledger_path, "a", encoding="utf-8")

    def _read_ledger(self) -> int | None:
        """Load the done keys; return the results file size the last complete line recorded."""
        if not os.path.exists(self.ledger_path):
            return None
        end = None
        good = 0
        with open(self.ledger_path, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw)
                    key, end_here = rec["key"], int(rec["end"])
                except (ValueError, KeyError, TypeError):
                    break  # a torn last line: everything after it is not done
                self.done[key] = rec
                end = end_here
                good += len(raw)
        if good != os.path.getsize(self.ledger_path):
            os.truncate(self.ledger_path, good)
        return end

    @staticmethod
    def _sync(stream) -> None:
        stream.flush()
        os.fsync(stream.fileno())

    def append(self, key: str, result, **record: Any) -> None:
        """Write ``result``'s row, then record ``key`` (and ``record``) as done."""
        self._writer.write(result)
        self._sync(self._stream)
        rec = {"key": key, **record, "end": os.fstat(self._stream.fileno()).st_size}
        self._ledger.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._sync(self._ledger)
        self.done[key] = rec

    def close(self) -> None:
        for stream in (self._stream, self._ledger):
            try:
                stream.close()
            except OSError:
                pass
