"""Version strings as requests carry them: "" (the model's policy), a version number, or an alias."""

from __future__ import annotations

INT64_MAX = 2**63 - 1
_MAX_DIGITS = len(str(INT64_MAX))


def version_number(version: str) -> int | None:
    """The version number `version` spells, or None when it spells none (empty, an alias, anything else).

    Only ASCII decimal digits that fit an int64 count, as Triton parses a version: str.isdigit() also
    takes "²", and int() takes "١" and "１" as 1 and refuses strings of more than 4300 digits.
    """
    if 0 < len(version) <= _MAX_DIGITS and version.isascii() and version.isdigit():
        number = int(version)
        if number <= INT64_MAX:
            return number
    return None
