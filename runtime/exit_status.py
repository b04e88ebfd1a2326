"""Exit statuses of the ``cxr-infer`` commands, and a scan's (local or on a cluster).

No imports: ``cli`` reads these at start-up, before any heavy module loads.
"""

EXIT_OK = 0
EXIT_SOME_ERRORS = 1  # some files became error rows (the output is still complete)
EXIT_USAGE = 2  # bad option, missing or invalid model, a cluster that cannot go on
EXIT_NOT_CHEST_XRAY = 3  # scan --strict only: some rows withheld by the input check
EXIT_INTERRUPTED = 130  # Ctrl-C, or the reader of stdout went away; finished rows are kept


def scan_exit_status(*, interrupted: bool, errors: int, withheld: int, strict: bool) -> int:
    """130 interrupted, else 1 some errors, else 3 (``--strict`` only) some rows withheld, else 0."""
    if interrupted:
        return EXIT_INTERRUPTED
    if errors:
        return EXIT_SOME_ERRORS
    return EXIT_NOT_CHEST_XRAY if strict and withheld else EXIT_OK
