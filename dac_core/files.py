"""Writing files so that nothing already saved is lost or half-written."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on any
    error it is removed and `path` keeps its old content. The file gets the permissions a
    plain `open(path, "w")` would give it (mkstemp's are owner-only)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, data, indent: int = 1, default=None) -> None:
    """Write `data` as JSON (UTF-8) to `path` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, default=default)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
