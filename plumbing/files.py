"""Files: atomic writes (a reader sees the old file or the whole new one), .jsonl, and the one
resumable chunk store of every long stage."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from plumbing.cli import DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or folder) next to `path`; on success it is renamed onto `path`, on
    error deleted. Unwritable or full storage ends in one line naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as error:
        raise DataError(f"{path}: cannot write there ({error.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())  # mkstemp makes 0600 files
        if folder and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True) if folder else tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):  # numpy's short write on a full disk has no strerror
            free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
            raise DataError(
                f"{path}: cannot write it ({error.strerror or error}; {free})"
            ) from None
        raise


def check_writable(*paths: str | os.PathLike) -> None:
    """Before any model loads: the nearest existing folder of each output takes a file (nothing
    is left behind)."""
    for path in map(Path, paths):
        folder = path.absolute().parent
        while not folder.exists():
            folder = folder.parent
        if not folder.is_dir():
            raise DataError(f"{path}: cannot write there ({folder} is a file, not a folder)")
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise DataError(f"{path}: cannot write there ({error.strerror})") from None


def load_npy(path: str | os.PathLike, mmap_mode: str | None = None) -> np.ndarray:
    """np.load, naming the file in any error (not a .npy file, truncated, unreadable)."""
    try:
        with open(path, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValueError("it does not start as a .npy file does")
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"{path}: cannot read it as a .npy array ({error})") from None


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """One line appended by a single write (a resumed run first cuts the file to its saved size)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read it as JSON ({error})") from None


def fingerprint(paths: Iterable[str]) -> dict[str, str]:
    """{"content of PATH": its sha256} for each existing file or folder. A stage adds them to its
    settings: an input edited in place is never taken for the one an output was made from."""
    paths = [p for p in dict.fromkeys(paths) if p and Path(p).exists()]  # not "", not a hub name
    return {f"content of {p}": content_sha256(p) for p in paths}


@functools.cache  # once per process: the sketch and GRPO read the same model folder twice
def content_sha256(path: str) -> str:
    """A file's sha256, or a folder's: the names and contents of its files, hidden ones left out."""
    path, digest = Path(path), hashlib.sha256()
    files = [path]
    if path.is_dir():
        inside = (f.relative_to(path) for f in path.rglob("*") if f.is_file())
        files = sorted(path / f for f in inside if not any(p[0] == "." for p in f.parts))
    for file in files:
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()[:16]


def differences(earlier: dict, now: dict) -> str:
    """ "key: was A, now B; ..." for every key whose value differs."""
    changed = sorted(k for k in earlier.keys() | now.keys() if earlier.get(k) != now.get(k))
    return "; ".join(f"{k}: was {earlier.get(k)!r}, now {now.get(k)!r}" for k in changed)


def already_done(marker: str | os.PathLike, settings: dict) -> bool:
    """A stage's output is complete and made with these settings: its marker file (written last)
    holds them under "settings". The one "nothing to do" check of every stage."""
    marker = Path(marker)
    return marker.is_file() and read_json(marker).get("settings") == settings


class ChunkStore:
    """The finished pieces of a long stage, so that a killed run resumes where it stopped.

    FOLDER/settings.json records what the pieces depend on; FOLDER/chunk_<index>.<npy|jsonl|dcp>
    is one finished piece, written atomically (.dcp: a folder of a training state, written by
    every process; see distributed.save_state). A rerun with the same settings skips the finished
    pieces; with other settings it is refused, naming what differs. The stage removes the folder
    when its output is complete.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder, self.settings = Path(folder), settings

    def open(self) -> set[int]:
        """Create the folder (or check its settings); the indices of the finished pieces. A folder
        without pieces (a run refused or killed before its first) takes the new settings."""
        settings_file = self.folder / "settings.json"
        finished = {int(f.name[6:12]) for f in self.folder.glob("chunk_*.*")}
        if not settings_file.exists() or not finished:
            write_json(settings_file, self.settings)
        details = differences(read_json(settings_file), self.settings)
        if details:
            raise DataError(
                f"{self.folder} holds pieces of a run with other settings ({details}); "
                "rerun with the same settings, or delete that folder to start over"
            )
        return finished

    def _path(self, index: int) -> Path:
        found = sorted(self.folder.glob(f"chunk_{index:06d}.*"))
        if not found:
            raise DataError(f"{self.folder}: piece {index} is missing; rerun to resume")
        return found[0]

    def save(self, index: int, value) -> None:
        """An ndarray as .npy, a list of dicts as .jsonl."""
        stem = self.folder / f"chunk_{index:06d}"
        if isinstance(value, np.ndarray):
            save_npy(stem.with_suffix(".npy"), value)
        else:
            write_jsonl(stem.with_suffix(".jsonl"), value)

    def keep_only(self, index: int) -> None:
        """Delete every piece but `index` (a training state needs its latest save only)."""
        for other in self.folder.glob("chunk_*.*"):
            if int(other.name[6:12]) != index:
                shutil.rmtree(other) if other.is_dir() else other.unlink()

    def load(self, index: int):
        """Piece `index`: an .npy or .jsonl's contents, else its path (a folder of another kind)."""
        path = self._path(index)
        if path.suffix == ".npy":
            return load_npy(path)
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        return path

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
