"""CSV cells a spreadsheet would run as a formula are written as text.

Hospital staff open result CSVs in Excel or LibreOffice, and both treat a cell that starts
with ``=``, ``+``, ``-`` or ``@`` (or a tab, CR or LF before one) as a formula -- which can
fetch URLs or, through DDE, start programs. File names, folder names, error messages and class
names come from outside, so every text cell of the CSV that starts with one of those characters
gets a leading single quote (OWASP's "CSV injection" advice): ``=cmd|' /C calc'!A0.png``
is written as ``'=cmd|' /C calc'!A0.png`` and shown as text.

A cell that already starts with a quote gets one more, so the rule reverses exactly: a program
reading the CSV drops one leading ``'`` from any text cell that starts with one
(``unguard_cell``). Numbers the runtime writes itself (probabilities, scores) are not text
cells and are never touched. JSON lines and JSON output carry the raw strings.
"""

from __future__ import annotations

FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")
QUOTE = "'"


def guard_cell(text: str) -> str:
    """``text`` as a spreadsheet shows it verbatim: quote-prefixed when it could start a formula."""
    if text.startswith(FORMULA_START) or text.startswith(QUOTE):
        return QUOTE + text
    return text


def unguard_cell(text: str) -> str:
    """The original text of a cell written by ``guard_cell``."""
    return text[1:] if text.startswith(QUOTE) else text
