"""What a received dataset must be before the node acknowledges it.

Every refusal is a C-STORE failure status with an ErrorComment saying why (a sending modality
shows it; dcmtk's storescu prints it), and a log line; the node goes on serving. Checks run on
the decoded header and on the pixel data's length before anything is written, so a film the
engine could not read is refused at the door instead of being acknowledged and then lost.

Limits: at most ``MAX_PIXELS`` (the scan's 80 MP decompression-bomb limit) over all frames, and
``MAX_DATASET_BYTES`` of encoded dataset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..imageio import MAX_PIXELS

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
FILM_SOP_CLASSES = {CR: "CR Image Storage", DX_PRESENTATION: "Digital X-Ray Image Storage - For Presentation",
                    DX_PROCESSING: "Digital X-Ray Image Storage - For Processing"}
MAX_DATASET_BYTES = 1 << 30  # 1 GiB: a 80 MP film at 16 bits is 160 MB

# C-STORE failure statuses (PS3.4 B.2.3: A7xx out of resources, A9xx data set does not match
# SOP class, Cxxx cannot understand; 0122 PS3.7 C.5.9 SOP class not supported)
OUT_OF_RESOURCES = 0xA700
NOT_SUPPORTED = 0x0122
DOES_NOT_MATCH = 0xA900
CANNOT_DECODE = 0xC210        # the dataset itself cannot be parsed
PIXELS_UNDECODABLE = 0xC211   # transfer syntax with no decoder here, or compressed data that fails to decode
PIXELS_TRUNCATED = 0xC212     # less pixel data than Rows x Columns x frames x samples x bits say
TOO_LARGE = 0xC213            # over MAX_PIXELS or MAX_DATASET_BYTES
NAMES = {OUT_OF_RESOURCES: "out of resources", NOT_SUPPORTED: "SOP class not supported",
         DOES_NOT_MATCH: "dataset does not match SOP class", CANNOT_DECODE: "cannot decode dataset",
         PIXELS_UNDECODABLE: "pixel data cannot be decoded", PIXELS_TRUNCATED: "pixel data cut short",
         TOO_LARGE: "image too large"}


_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def valid_uid(text: str) -> bool:
    """A DICOM UID (PS3.5 9.1): digits and dots, no leading zeros, at most 64 characters."""
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str

    def __str__(self) -> str:
        return f"0x{self.status:04X} {NAMES.get(self.status, '')}: {self.reason}"


def _int(ds, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def check_film(ds, transfer_syntax: str, encoded_bytes: int) -> Refusal | None:
    """None when ``ds`` is a CR/DX film the engine can read, else the refusal to answer with."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class not in FILM_SOP_CLASSES:
        return Refusal(NOT_SUPPORTED, f"SOP class {sop_class or '(none)'} is not a CR or DX film; this node "
                                      "classifies CR and DX images only")
    for keyword in ("SOPInstanceUID", "StudyInstanceUID"):  # the result's UIDs and study come from these
        uid = str(ds.get(keyword, "") or "")
        if not uid:
            return Refusal(DOES_NOT_MATCH, f"missing {keyword} (a result needs a film and a study to go into)")
        if not valid_uid(uid):
            return Refusal(DOES_NOT_MATCH, f"{keyword} is not a valid UID (digits and dots, at most 64)")
    if encoded_bytes > MAX_DATASET_BYTES:
        return Refusal(TOO_LARGE, f"dataset is {encoded_bytes / 1e6:.0f} MB, over the "
                                  f"{MAX_DATASET_BYTES / 1e6:.0f} MB limit")
    if "PixelData" not in ds:
        return Refusal(DOES_NOT_MATCH, "no pixel data")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    bits, samples = _int(ds, "BitsAllocated"), _int(ds, "SamplesPerPixel") or 1
    frames = _int(ds, "NumberOfFrames") or 1
    if not rows or not cols or not bits or rows < 1 or cols < 1 or frames < 1 or samples < 1:
        return Refusal(DOES_NOT_MATCH, f"missing or invalid Rows/Columns/BitsAllocated "
                                       f"({rows}x{cols}, {bits} bits)")
    if rows * cols * frames > MAX_PIXELS:
        return Refusal(TOO_LARGE, f"image is {cols}x{rows} x {frames} frame(s) "
                                  f"({rows * cols * frames / 1e6:.0f} MP), over the {MAX_PIXELS / 1e6:.0f} MP limit")
    from pydicom.uid import UID

    ts = UID(transfer_syntax)
    if ts.is_compressed:
        return _check_compressed(ds, ts)
    expected = (rows * cols * frames * samples * bits + 7) // 8
    have = len(ds.PixelData)
    if have < expected:
        return Refusal(PIXELS_TRUNCATED, f"pixel data is {have} bytes; {cols}x{rows} x {frames} frame(s) x "
                                         f"{samples} sample(s) x {bits} bits needs {expected}")
    return None


def _check_compressed(ds, ts) -> Refusal | None:
    """A compressed film is decoded here once, so a broken one is refused before it is acknowledged."""
    from pydicom.pixels import get_decoder

    try:
        available = get_decoder(ts).is_available
    except (NotImplementedError, ValueError):
        available = False
    if not available:
        return Refusal(PIXELS_UNDECODABLE, f"transfer syntax {ts.name} ({ts}) has no pixel decoder here; send "
                                           "the film uncompressed or in JPEG / JPEG 2000 / JPEG-LS / RLE")
    try:
        ds.pixel_array  # noqa: B018 -- decoding is the check
    except Exception as exc:  # decoders raise many types for damaged data
        return Refusal(PIXELS_UNDECODABLE, f"{ts.name} pixel data does not decode: {exc or exc.__class__.__name__}")
    return None
