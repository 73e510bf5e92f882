"""Errors that name what is wrong and where: the file, the line, or the config field."""

from __future__ import annotations


class Me5Error(Exception):
    """Base class of every error me5 raises on purpose (bad input, bad config)."""


class ConfigError(Me5Error):
    """A config value is unknown, out of range, or contradicts another one.

    ``field`` is the dotted config path (``trainer.devices``), so the message points at the override to fix.
    """

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class DataError(Me5Error):
    """A data file or record is missing or malformed.

    The message names the file, and the 1-based line (jsonl) or row (parquet/hub) and the field when known.
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        where = []
        if file is not None:
            where.append(str(file) + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"record {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class SkipRecord(Exception):
    """Raised by a source's ``convert`` to skip a record on purpose; ``reason`` is counted (``skipped/<reason>``)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)
