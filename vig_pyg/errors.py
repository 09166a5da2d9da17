"""Errors a user can fix: bad data, a bad checkpoint, a run directory in the way.

The command line prints the message of a :class:`UsageError` as one line on stderr and exits with status 2,
so every message says what is wrong and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DataError",
    "OutputError",
    "PeerError",
    "RunDirError",
    "UsageError",
    "one_line",
]


class UsageError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""


class DataError(UsageError):
    """A data folder or image that cannot be used."""


class CheckpointError(UsageError):
    """A checkpoint that cannot be read or does not fit the model."""


class RunDirError(UsageError):
    """An output directory that would be overwritten, one with nothing to resume, or one in use."""


class PeerError(UsageError):
    """Another process of a distributed run stopped, so this one cannot go on."""


class OutputError(UsageError):
    """A file that cannot be written: a full disk, a read-only or missing folder, a folder in the way."""


def one_line(err: BaseException) -> str:
    """The message of ``err`` as one line.

    An error raised in a DataLoader worker arrives with the worker's traceback in its message; its last
    line (``module.Type: message``) holds the original message.
    """
    text = str(err).strip()
    if not text:
        return type(err).__name__
    lines = text.splitlines()
    if len(lines) == 1:
        return lines[0]
    last = lines[-1].strip()
    head, sep, rest = last.partition(": ")
    if sep and head.rsplit(".", 1)[-1].endswith(("Error", "Exception")):
        return rest
    return last
