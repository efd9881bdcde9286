"""Durable, atomic writes: the one convention for every file the testbed leaves on disk
(checkpoints in reference/weights.py, reports in oracle/report.py, captures in oracle/capture.py).

- A file is written under a fresh temporary name beside its target, fsynced, then os.replace'd
  onto the target, and the directory is fsynced: a reader sees the old file or the new one, never
  half of one, and a crash leaves at most a dot-named temporary behind.
- Modes follow the umask, as for any file a program writes: 0666 (files) and 0777 (directories)
  less the umask, i.e. 0644/0755 under the usual 022. Not tempfile.mkstemp/mkdtemp: their
  0600/0700 would become the mode of a report, capture or checkpoint once renamed into place.

And the one way files are parsed as JSON (`parse_json`): every way json fails, as one
ValueError whose message says what is wrong, for the readers to name their file.

It lives in reference/ (depending on nothing but the standard library) so that reference/ and
oracle/ both import it without breaking the one-way import rule (reference <- optimized <- oracle).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Callable

__all__ = ["write_atomic", "write_durably", "fresh_dir", "fsync_dir", "why_not_creatable"]


def parse_json(text: str):
    """json.loads(text); any failure is a ValueError "not valid JSON (why)": json's own errors, a
    nesting deeper than the recursion limit (its parser recurses once per array or object), an
    integer of more digits than int() takes (4300 by default; json raises a plain ValueError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None


def write_atomic(target: str | os.PathLike, content: bytes | str | Callable[[Path], None]) -> Path:
    """Replace `target` atomically with `content`: bytes, str (written as UTF-8), or a callable
    that writes the temporary path it is given (for writers that take a file name, such as
    safetensors' save_file). Returns the target's Path."""
    target = Path(target)
    tmp, fd = _fresh_file(target.parent, f".{target.name}.", ".tmp")
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
            _fsync_file(tmp)
        else:
            data = content.encode("utf-8") if isinstance(content, str) else content
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target


def write_durably(path: str | os.PathLike, data: bytes) -> None:
    """Write a new file (inside a staging directory, which is what gets renamed) and fsync it."""
    with open(path, "wb") as f:  # open's mode: 0666 less the umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fresh_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new directory `parent/<prefix><random>` with mode 0777 less the umask."""
    while True:
        path = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:  # another writer's directory: draw another name
            continue


def why_not_creatable(path: str | os.PathLike) -> str | None:
    """Why a directory at `path` (or files in it, where it exists) cannot be made, or None: its
    first existing ancestor (or itself) must be a directory a new entry can be made in. Tried by
    making and removing an empty probe directory there, because os.access answers yes for root on
    a read-only mount and on /proc, where the real mkdir fails after a whole run."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        return f"cannot be created, {existing} is not a directory"
    try:
        fresh_dir(existing, ".probe-").rmdir()
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror or e})"
    return None


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a directory's entries (a rename into it) durable; a no-op where directories cannot
    be opened (the rename is still atomic there, only less durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory
    finally:
        os.close(fd)


def _fresh_file(parent: Path, prefix: str, suffix: str) -> tuple[Path, int]:
    while True:
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # another writer's temporary file: draw another name
            continue


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
