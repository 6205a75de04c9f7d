"""Writing files and directories so that an interrupted save never leaves a corrupt one in place.

Exports also keep a manifest, ``bnb_lightning_export.json`` (:data:`MANIFEST`), in the directory they
write: the files each kind of export wrote there. A later export replaces or removes only those, so a
directory shared with other files (a tokenizer, a base model saved with ``save_pretrained``, the
user's own) never loses one that bnb_lightning did not write.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

# The manifest of an export directory. Format (JSON):
#   {"format": "bnb_lightning export", "version": 1,
#    "exports": {"adapters": {"files": ["adapter_config.json", "adapter_model.safetensors"], "base": {...}},
#                "merged": {"files": ["config.json", "generation_config.json", "model.safetensors"]}}}
# Each kind of export lists the names it wrote directly in the directory, and may add more to its entry
# (export_adapters: the base the adapters were trained on).
MANIFEST = "bnb_lightning_export.json"
MANIFEST_FORMAT = "bnb_lightning export"
MANIFEST_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes.

    Write the whole file to the yielded path. If the block raises, the temporary file is removed and
    ``path`` (a previous version included) is left exactly as it was. The file is flushed to disk
    before the rename and the directory after it, so the new name survives a power loss too.

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
        _fsync(path.parent)
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


def _carry_over(previous: Path, new: Path, removed: Collection[str]) -> None:
    """Hard-link the previous directory's entries into the new one, except those written anew or ``removed``."""
    for entry in previous.iterdir():
        if (new / entry.name).exists() or entry.name in removed:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(new / entry.name))


def _refuse_overwrites(previous: Path, new: Path, replaceable: Collection[str]) -> None:
    """Raise if the new version wrote an entry that the previous one holds and may not be replaced."""
    kept = sorted(
        entry.name
        for entry in new.iterdir()
        if entry.name not in replaceable and os.path.lexists(previous / entry.name)
    )
    if kept:
        raise FileExistsError(
            f"{previous} already holds {kept}, which this write may not replace; nothing was changed. "
            "Write into another (or an empty) directory, or remove those entries yourself."
        )


@contextlib.contextmanager
def atomic_directory(
    directory: str | os.PathLike, *, replaceable: Collection[str] = (), removed: Collection[str] = ()
) -> Iterator[Path]:
    """Yield an empty directory beside ``directory``; it replaces ``directory`` only if the block finishes.

    The caller says which entries (names directly inside ``directory``) of a previous version it owns:

    - ``replaceable``: entries the block may write anew, replacing the previous ones. Writing an entry
      the previous version holds and that is not ``replaceable`` (or ``removed``) raises
      ``FileExistsError`` before the swap.
    - ``removed``: entries dropped unless the block writes them anew (they are replaceable too).
    - Every other entry is carried over (hard-linked, so byte for byte the same file).

    If the block raises, the temporary directory is removed and ``directory`` is left exactly as it
    was. A previous ``directory`` is renamed aside for the swap and removed afterwards; only a crash
    between the two renames leaves it as ``.<name>.<random>.previous`` beside the target.

    Example::

        with atomic_directory("export/", replaceable={"model.safetensors"}) as partial:
            save_file(tensors, partial / "model.safetensors")
    """
    directory = Path(directory).expanduser().resolve()
    removed = frozenset(removed)
    replaceable = frozenset(replaceable) | removed
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
            _refuse_overwrites(directory, partial, replaceable)
            _carry_over(directory, partial, removed)
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


# -- export directories and their manifest ---------------------------------------------------------------


def _valid_exports(manifest: Any) -> dict[str, dict[str, Any]]:
    """The ``exports`` of a parsed manifest; ``ValueError`` saying what is wrong with it otherwise."""
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f'it has no "format": {json.dumps(MANIFEST_FORMAT)} entry')
    version = manifest.get("version")
    if not isinstance(version, int) or version > MANIFEST_VERSION:
        raise ValueError(f"version {version!r}: this bnb_lightning reads versions up to {MANIFEST_VERSION}")
    exports = manifest.get("exports")
    if not isinstance(exports, dict):
        raise ValueError('it has no "exports" object')
    for kind, entry in exports.items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
            raise ValueError(f"exports[{kind!r}] has no list of file names")
    return exports


def read_manifest(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The exports recorded in ``directory``'s :data:`MANIFEST`, by kind; ``{}`` when there is none.

    Raises:
        ValueError: a file of that name is there but is not a manifest that bnb_lightning wrote.
    """
    path = Path(directory).expanduser() / MANIFEST
    if not os.path.lexists(path):
        return {}
    try:
        return _valid_exports(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"{path} is not a manifest written by bnb_lightning ({error}); bnb_lightning keeps there the list "
            "of files its exports wrote. Use another directory, or remove it (the files of the previous "
            "export then count as not written by bnb_lightning, and an export refuses to replace them)."
        ) from error


def _owned_files(exports: dict[str, dict[str, Any]]) -> set[str]:
    return {name for entry in exports.values() for name in entry["files"]}


def _refuse_foreign_files(
    directory: Path, names: Collection[str], exports: dict[str, dict[str, Any]]
) -> None:
    """Raise if ``directory`` holds one of ``names`` that no export recorded in ``exports`` wrote there."""
    owned = _owned_files(exports) | {MANIFEST}
    foreign = sorted(name for name in names if name not in owned and os.path.lexists(directory / name))
    if not foreign:
        return
    it = "it" if len(foreign) == 1 else "them"
    why = (
        f"{MANIFEST} there does not list {it}"
        if os.path.lexists(directory / MANIFEST)
        else f"there is no {MANIFEST}, which every bnb_lightning export writes"
    )
    paths = " ".join(str(directory / name) for name in foreign)
    raise FileExistsError(
        f"cannot export into {directory}: it holds {', '.join(foreign)}, which bnb_lightning did not write "
        f"({why}), and this export would replace {it}. Nothing in it was changed. Export into another (or an "
        f"empty) directory, or remove {paths} yourself if no longer needed."
    )


def check_export_directory(directory: str | os.PathLike, names: Collection[str]) -> dict[str, dict[str, Any]]:
    """Refuse an export that would write ``names`` over files of ``directory`` that bnb_lightning did not write.

    Returns:
        The exports recorded in ``directory``'s manifest (:func:`read_manifest`).

    Raises:
        FileExistsError: naming the files, with the fix.
        ValueError: ``directory`` holds a :data:`MANIFEST` that is not ours.
    """
    exports = read_manifest(directory)
    _refuse_foreign_files(Path(directory).expanduser(), names, exports)
    return exports


def _manifest(exports: dict[str, dict[str, Any]], kind: str, entry: dict[str, Any]) -> dict[str, Any]:
    """The manifest after an export of ``kind``: its entry, and the other kinds' files it did not replace."""
    written = set(entry["files"])
    others = {}
    for other, previous in exports.items():
        files = [name for name in previous["files"] if name not in written]
        if other != kind and files:
            others[other] = {**previous, "files": files}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "exports": {**others, kind: entry}}


@contextlib.contextmanager
def export_directory(
    directory: str | os.PathLike,
    kind: str,
    *,
    writes: Collection[str] = (),
    record: dict[str, Any] | None = None,
) -> Iterator[Path]:
    """Yield an empty directory for an export of ``kind``; swapped in for ``directory`` once complete.

    The rules, given the :data:`MANIFEST` of the previous export(s) in ``directory``:

    - a file the new export writes replaces a file of the same name only if the manifest lists it (under
      any kind); otherwise the export is refused before ``directory`` changes, naming the file;
    - files the manifest lists under ``kind`` that the new export does not write again are removed
      (e.g. the shards of a previous, larger merged model); files listed under another kind stay, so an
      adapter export and a merged export can share a directory;
    - everything else in ``directory`` (a tokenizer, a README, the user's own files) is kept, byte for byte.

    The block writes the export's files; afterwards the manifest is written beside them, listing them
    under ``kind`` (with ``record`` added to that entry), and the whole directory is swapped in by
    :func:`atomic_directory`. If anything fails, ``directory`` is left exactly as it was.

    Args:
        directory: the export directory.
        kind: which export writes (``"adapters"``, ``"merged"``): each kind owns the files it wrote.
        writes: names the export will certainly write, checked before the block runs, so that a refusal
            comes before any file is written; every name the block wrote is checked again after it.
        record: more to keep in this export's manifest entry (e.g. ``{"base": ...}``).

    Raises:
        FileExistsError: the export would replace a file that bnb_lightning did not write.
    """
    exports = check_export_directory(directory, writes)
    previous_files = set(exports.get(kind, {}).get("files", ()))
    with atomic_directory(
        directory, replaceable=_owned_files(exports) | {MANIFEST}, removed=previous_files
    ) as partial:
        yield partial
        written = sorted(entry.name for entry in partial.iterdir())
        _refuse_foreign_files(Path(directory).expanduser(), written, exports)
        manifest = _manifest(exports, kind, {"files": written, **(record or {})})
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
