"""Writing files and directories so that an interrupted save never leaves a corrupt one in place."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes.

    Write the whole file to the yielded path. If the block raises, the temporary file is removed and
    ``path`` (a previous version included) is left exactly as it was.

    Example::

        with atomic_path("adapter_model.safetensors") as tmp:
            safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_over(previous: Path, new: Path, replaced: tuple[str, ...]) -> None:
    """Hard-link the previous directory's entries into the new one, except those written anew or ``replaced``."""
    for entry in previous.iterdir():
        if (new / entry.name).exists() or any(fnmatch.fnmatch(entry.name, p) for p in replaced):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, *, replaced: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty directory beside ``directory``; it replaces ``directory`` only if the block finishes.

    Entries of a previous ``directory`` that the block did not write are carried over (hard-linked),
    except those matching a glob pattern in ``replaced``. If the block raises, the temporary directory
    is removed and ``directory`` is left as it was. A previous ``directory`` is renamed aside for the
    swap and removed afterwards; only a crash between the two renames leaves it as
    ``.<name>.<random>.previous`` beside the target.
    """
    directory = Path(directory).expanduser().resolve()
    replaced = tuple(replaced)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot export to {directory}: it is a file; pass a directory path.")
    directory.parent.mkdir(parents=True, exist_ok=True)
    while True:
        stem = directory.parent / f".{directory.name}.{secrets.token_hex(4)}"
        partial, previous = Path(f"{stem}.partial"), Path(f"{stem}.previous")
        try:
            partial.mkdir()  # mode from the umask, as for a directory the user makes
            break
        except FileExistsError:
            continue
    try:
        yield partial
        if directory.exists():
            _carry_over(directory, partial, replaced)
        for folder, _, files in os.walk(partial):
            for name in files:
                if not os.path.islink(os.path.join(folder, name)):
                    _fsync(Path(folder, name))
            _fsync(Path(folder))
        if directory.exists():
            os.rename(directory, previous)
            try:
                os.rename(partial, directory)
            except BaseException:
                os.rename(previous, directory)
                raise
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.rename(partial, directory)
        _fsync(directory.parent)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
