"""Atomic writes: an output is either complete or absent, never half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Collection, Iterator

from .errors import RankcutError


def check_output(target: str | os.PathLike, overwrite: bool = False,
                 replaceable: Collection[str] | None = None) -> None:
    """Whether `target` may be replaced by a new output folder. `replaceable` names what the caller
    writes there itself (a report's files, a checkpoint's): a folder holding only those is a rerun
    to replace, one holding anything else is somebody's folder and is never deleted."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise RankcutError(f"output {target} is a file, not a folder; give a folder path for --out")
    check_writable(target)
    if not target.exists() or overwrite:
        return
    if replaceable is not None:
        foreign = sorted(p.name for p in target.iterdir() if p.name not in replaceable)
        if not foreign:
            return
        raise RankcutError(f"folder {target} holds files rankcut did not write there (e.g. {foreign[0]}); "
                           "give a new or empty folder")
    raise RankcutError(f"output folder {target} already exists; pick another --out or pass --overwrite")


def check_writable(target: str | os.PathLike) -> None:
    """Before any work: the nearest folder that exists on the way to `target` must be a folder this
    process may write in, so a long run does not end in a failed write."""
    path = Path(target).absolute()
    for parent in path.parents:
        if not parent.exists():
            continue
        if not parent.is_dir():
            raise RankcutError(f"cannot write {target}: {parent} is a file, not a folder")
        try:  # a real try, not os.access: root passes that on read-only and virtual file systems
            os.rmdir(tempfile.mkdtemp(prefix=".rankcut-probe-", dir=parent))
        except OSError as exc:
            raise RankcutError(f"cannot write {target}: {parent} refuses new files ({exc.strerror or exc}); "
                               "give another path") from None
        return


def check_output_file(target: str | os.PathLike) -> None:
    """Before any work: `target` names a file rankcut may (re)write, not a folder."""
    if str(target).endswith(("/", os.sep)) or Path(target).is_dir():
        raise RankcutError(f"{target} is a folder; give a file path such as {Path(target) / 'results.json'}")
    check_writable(target)


@contextlib.contextmanager
def failed_write(target: str | os.PathLike) -> Iterator[None]:
    """An OS refusal (read-only or full disk, a path the system will not create) as one line."""
    try:
        yield
    except OSError as exc:
        raise RankcutError(f"cannot write {target}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False,
               replaceable: Collection[str] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it into place only if the body succeeds.
    An existing `target` is replaced only as `check_output` allows."""
    target = Path(target)
    check_output(target, overwrite, replaceable)
    with failed_write(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with failed_write(target):
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except OSError:
                    os.replace(old, target)  # the earlier output stays, whole
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
    except RankcutError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename: readers see all of it or none."""
    path = Path(path)
    if path.is_dir():
        raise RankcutError(f"cannot write {path}: it is a folder; give a file path")
    with failed_write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with failed_write(path):
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a results file is for everyone to read
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """Where converted models live; `RANKCUT_CACHE` moves it (CI, shared machines)."""
    return Path(os.environ.get("RANKCUT_CACHE", Path.home() / ".cache" / "rankcut"))
