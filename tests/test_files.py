"""Atomic directories and export manifests: what a write may replace, what it removes, what it keeps."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import leftovers

from bnb_lightning.io.files import MANIFEST, atomic_directory, export_directory, read_manifest


def files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}


def write(directory: Path, contents: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        (directory / name).write_text(text)


def exports(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())["exports"]


# -- atomic_directory -------------------------------------------------------------------------------------------


def test_atomic_directory_replaces_and_removes_only_what_it_is_told(tmp_path):
    directory = tmp_path / "out"
    write(directory, {"a.txt": "old a", "b.txt": "old b", "c.txt": "user's c"})
    c_inode = (directory / "c.txt").stat().st_ino

    with atomic_directory(directory, replaceable={"a.txt"}, removed={"b.txt"}) as partial:
        (partial / "a.txt").write_text("new a")

    assert files(directory) == {"a.txt": b"new a", "c.txt": b"user's c"}
    assert (directory / "c.txt").stat().st_ino == c_inode  # carried over as the same file
    assert leftovers(tmp_path) == []


def test_atomic_directory_refuses_to_overwrite_an_entry_it_does_not_own(tmp_path):
    directory = tmp_path / "out"
    write(directory, {"a.txt": "old a", "c.txt": "user's c"})
    with pytest.raises(
        FileExistsError, match=re.escape(f"{directory} already holds ['c.txt'], which this write")
    ):
        with atomic_directory(directory, replaceable={"a.txt"}) as partial:
            (partial / "a.txt").write_text("new a")
            (partial / "c.txt").write_text("ours")
    assert files(directory) == {"a.txt": b"old a", "c.txt": b"user's c"}
    assert leftovers(tmp_path) == []


# -- export_directory and its manifest ---------------------------------------------------------------------------


def test_each_kind_of_export_replaces_and_removes_only_its_own_files(tmp_path):
    directory = tmp_path / "export"
    write(directory, {"tokenizer.json": "{}"})
    with export_directory(directory, "adapters", record={"base": None}) as partial:
        write(partial, {"x.json": "x1", "y.bin": "y1"})
    with export_directory(directory, "merged") as partial:
        write(partial, {"z.bin": "z1"})
    assert exports(directory) == {
        "adapters": {"files": ["x.json", "y.bin"], "base": None},
        "merged": {"files": ["z.bin"]},
    }

    with export_directory(directory, "adapters") as partial:
        write(partial, {"x.json": "x2"})

    # y.bin was the previous adapter export's and is not written again: removed. z.bin is the merged
    # export's and the tokenizer the user's: kept.
    assert files(directory) == {
        MANIFEST: (directory / MANIFEST).read_bytes(),
        "tokenizer.json": b"{}",
        "x.json": b"x2",
        "z.bin": b"z1",
    }
    assert exports(directory) == {"merged": {"files": ["z.bin"]}, "adapters": {"files": ["x.json"]}}


def test_a_file_another_kind_of_export_wrote_moves_to_the_kind_that_writes_it_again(tmp_path):
    directory = tmp_path / "export"
    with export_directory(directory, "adapters") as partial:
        write(partial, {"shared.json": "adapters", "a.bin": "a"})
    with export_directory(directory, "merged") as partial:
        write(partial, {"shared.json": "merged"})
    assert (directory / "shared.json").read_text() == "merged"
    assert exports(directory) == {"adapters": {"files": ["a.bin"]}, "merged": {"files": ["shared.json"]}}


def test_a_file_we_did_not_write_is_refused_before_the_export_writes(tmp_path):
    directory = tmp_path / "export"
    write(directory, {"config.json": "the user's"})
    before = files(directory)
    ran = []
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"cannot export into {directory}: it holds config.json, which bnb_lightning did not write (there is "
            f"no {MANIFEST}, which every bnb_lightning export writes), and this export would replace it. "
            f"Nothing in it was changed. Export into another (or an empty) directory, or remove "
            f"{directory / 'config.json'} yourself if no longer needed."
        ),
    ):
        with export_directory(directory, "merged", writes={"config.json"}):
            ran.append(True)
    assert ran == [] and files(directory) == before and leftovers(tmp_path) == []


def test_a_file_the_manifest_does_not_list_is_refused_after_the_block_wrote_it(tmp_path):
    directory = tmp_path / "export"
    with export_directory(directory, "merged") as partial:
        write(partial, {"model.bin": "ours"})
    write(directory, {"adapter.json": "copied in by the user"})
    before = files(directory)
    with pytest.raises(
        FileExistsError, match=rf"it holds adapter.json, .* \({MANIFEST} there does not list it\)"
    ):
        with export_directory(directory, "adapters") as partial:
            write(partial, {"adapter.json": "ours"})
    assert files(directory) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "content", ["not json", '{"exports": {}}', '{"format": "bnb_lightning export", "version": 1}']
)
def test_a_manifest_we_did_not_write_is_refused(tmp_path, content):
    directory = tmp_path / "export"
    write(directory, {MANIFEST: content})
    with pytest.raises(
        ValueError, match=rf"{directory / MANIFEST} is not a manifest written by bnb_lightning"
    ):
        read_manifest(directory)
    with pytest.raises(ValueError, match="is not a manifest written by bnb_lightning"):
        with export_directory(directory, "adapters"):
            pass
    assert (directory / MANIFEST).read_text() == content


def test_exported_files_are_readable_like_any_other(tmp_path):
    from bnb_lightning.io.files import atomic_write_bytes

    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"data")
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"data")
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
