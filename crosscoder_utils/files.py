"""What every stage writes beside its results: JSON written atomically, the one rule for reusing a
directory (a directory made with other settings is refused, never mixed or overwritten), and fingerprints
of input files (so that inputs changed at the same path are noticed)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root (with an editable install): paths recorded under it are kept relative to it."""


def portable(path: str) -> str:
    """A local path under the repository as a path relative to it, so that a record travels with the repository
    (``resolve`` turns it back); a local path elsewhere as an absolute one (from an installed package, REPO is
    site-packages' parent, and a relative path is the working directory's); a URL unchanged."""
    if "://" in path:
        return path
    local = Path(path).expanduser().resolve()
    return str(local.relative_to(REPO)) if local.is_relative_to(REPO) else str(local)


def resolve(path: str) -> str:
    """A path ``portable`` recorded, as one to open: a relative one is under the repository."""
    return path if "://" in path or Path(path).is_absolute() else str(REPO / path)


def parse_json(text: str | bytes, where, keys: tuple[str, ...] = ()) -> dict:
    """The JSON object in ``text`` read from the file ``where``, holding each of ``keys``, or an error naming that
    file when it is damaged (not JSON, not an object, or lacking a key)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where} is not valid JSON ({error}): the file is damaged") from error
    if not isinstance(value, dict):
        raise ValueError(f"{where} holds {json.dumps(value)[:40]}, not a JSON object: the file is damaged")
    missing = [key for key in keys if key not in value]
    if missing:
        raise ValueError(f"{where} lacks {missing}: the file is damaged")
    return value


def read_json(path: str | Path, keys: tuple[str, ...] = ()) -> dict:
    """A local JSON file holding each of ``keys``, or an error naming it when it is damaged (``parse_json``)."""
    return parse_json(Path(path).read_text(), path, keys)


def write_json(path: str | Path, value: dict) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def differing_keys(recorded: dict, wanted: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, nested dicts followed down as ``outer.inner``."""
    keys = []
    for key in sorted(recorded.keys() | wanted.keys()):
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            keys += differing_keys(old, new, f"{prefix}{key}.")
        elif old != new:
            keys.append(f"{prefix}{key}")
    return keys


def check_same_settings(directory: str | Path, what: str, recorded: dict, wanted: dict, remedy: str) -> None:
    """Refuse ``directory`` when the settings it recorded for ``what`` (a store, a run, an organism) are not
    ``wanted``; ``remedy`` says what to do instead."""
    differ = differing_keys(recorded, wanted)
    if differ:
        raise ValueError(f"{directory} holds {what} made with other settings (differing: {differ}); {remedy}")


def fingerprint(path: str | Path) -> dict[str, list]:
    """{file: [size, sha256]} of every file under a local directory (or of one file): what a store records of
    the local models and data it was collected from."""
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    result = {}
    for file in files:
        with file.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        result[str(file.relative_to(path)) if path.is_dir() else file.name] = [file.stat().st_size, digest]
    return result


def take_lock(lock: Path) -> None:
    """Create ``lock`` holding this process's id; refuse when another live process holds it (a lock left by
    a process that is gone, or by this one, is taken over)."""
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            refuse_if_held(lock)
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return


def refuse_if_held(lock: Path) -> None:
    """Refuse when another live process holds ``lock``; take nothing (a call that may still be refused for
    another reason checks this, so that it leaves the lock as it found it)."""
    try:
        text = lock.read_text().strip()
    except FileNotFoundError:
        return
    if not text.isdigit() and text:
        raise ValueError(
            f"the lock file {lock} holds {text[:40]!r}, not a process id: delete it if no process writes in "
            f"{lock.parent}"
        )
    holder = int(text or 0)
    if holder not in (0, os.getpid()) and alive(holder):
        raise RuntimeError(
            f"{lock.parent} is being written by process {holder} (lock file {lock}); wait for it to "
            "finish, or delete the lock file if that process no longer writes there"
        )


def alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
