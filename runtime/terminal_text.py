"""Text from outside, made safe to print on a terminal.

A file name may hold ESC sequences (which recolour, retitle or rewrite a terminal), carriage
returns that overwrite the line, or Unicode bidi overrides that make ``gpj.exe`` read as
``exe.jpg``. The table output shows such characters as visible escapes (``\\x1b``,
``\\u202e``) instead of sending them to the terminal. Machine formats keep the raw text.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the bidi embedding/override/isolate characters
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: "re.Match[str]") -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str) -> str:
    """``text`` with control and bidi-override characters shown as ``\\xNN`` / ``\\uNNNN``."""
    return _UNPRINTABLE.sub(_escape, text)
