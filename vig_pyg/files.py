"""Writing files so that no crash, kill or full disk leaves a half-written one, and checksums of saved state.

Every file of a run is written to a temporary name in its own folder (``.NAME.<pid>.tmp``), flushed to disk
and renamed over ``NAME``: a reader sees the old file or the new one, never a mixture. A temporary file
left by a killed process is recognised by its name (:func:`is_temporary`) and removed by the next run that
holds the folder. Ctrl-C, SIGTERM and SIGHUP arriving while a file is written take effect once it is
written (:func:`signals_deferred`): a stop never tears a writer (``torch.save``'s zip writer, for one)
apart mid-record.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from vig_pyg.errors import OutputError

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "is_temporary",
    "replace_file",
    "signals_deferred",
    "state_digest",
]

_TEMPORARY = re.compile(r"\..+\.\d+\.tmp")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary files."""
    return _TEMPORARY.fullmatch(name) is not None


def _tmp_path(path: Path) -> Path:
    # Same folder, so that the rename is atomic (one file system); the pid keeps writers apart.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_file(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path`` and make the rename durable (the step after which ``path`` is new)."""
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some systems cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back Ctrl-C, SIGTERM and SIGHUP while the block runs, then deliver them to their handlers.

    A stop signal's handler raises (``KeyboardInterrupt``) wherever the main thread is; inside a C++
    writer calling back into Python that leaves the writer broken (and, in a destructor, aborts the
    process). Here a signal received during the block is recorded and raised again when it ends, so the
    handler acts at a point where every file is whole. Outside the main thread this does nothing (signals
    are only delivered there).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in dict.fromkeys(received):  # each signal once, in order of arrival
            signal.raise_signal(signum)


def _advice(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space or choose another output folder"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "choose a folder you can write to"
    return "check the output folder"


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise OutputError(f"cannot write {path}: a folder of that name is in the way; choose another name")
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: {path.parent} is a file, not a folder")
    if not path.parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {path.parent} does not exist; create it first")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(file)`` on a temporary file, flush it to disk, then rename it to ``path``.

    Raises:
        OutputError: the file could not be written (full disk, read-only folder, ...); ``path`` is as it
            was, and no temporary file is left.
    """
    path = Path(path)
    _check_target(path)
    tmp = _tmp_path(path)
    try:
        with signals_deferred():
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            replace_file(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror or err}): {_advice(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new contents to, renamed over ``path`` when the block ends.

    For writers that take a file name rather than a file object; an error inside the block leaves
    ``path`` as it was and removes the temporary file.
    """
    path = Path(path)
    _check_target(path)
    tmp = _tmp_path(path)
    try:
        with signals_deferred():
            yield tmp
            replace_file(tmp, path)
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror or err}): {_advice(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(data))


# -- checksums ------------------------------------------------------------------------------------------
def _feed(h: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, Mapping):
        h.update(b"{")
        for key in sorted(value, key=repr):
            h.update(repr(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(b"[" if isinstance(value, list) else b"(")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    else:  # plain values: repr is exact for floats and distinguishes types (1 / 1.0 / '1' / True)
        h.update(f"{type(value).__name__}:{value!r};".encode())


def state_digest(state: Mapping[str, Any], exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 of a nested state (tensors by dtype, shape and bytes; plain values by type and repr)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k not in exclude})
    return h.hexdigest()
