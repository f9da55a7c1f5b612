"""lens_merge.files: artifacts appear complete or not at all, with ordinary permissions."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from lens_merge.files import (
    TEMP_MARK,
    atomic_dir,
    atomic_file,
    file_sha256,
    ordinary_permissions,
    replace_dir,
    temp_sibling,
    write_json_atomic,
    write_text_atomic,
)


class Boom(Exception):
    pass


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if TEMP_MARK in p.name)


def test_atomic_file_leaves_nothing_on_exception(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with pytest.raises(Boom), atomic_file(target) as tmp:
        assert tmp.parent == target.parent and TEMP_MARK in tmp.name
        tmp.write_text("half")
        raise Boom
    assert not target.exists()
    assert _leftovers(target.parent) == []


def test_atomic_file_keeps_the_old_file_on_exception(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(Boom), atomic_file(target) as tmp:
        tmp.write_text("new")
        raise Boom
    assert target.read_text() == "old" and _leftovers(tmp_path) == []


def test_atomic_file_replaces_and_refuses_an_empty_write(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(FileNotFoundError, match="nothing was written"), atomic_file(target):
        pass
    assert target.read_text() == "new" and _leftovers(tmp_path) == []


def test_atomic_dir_leaves_nothing_on_exception_and_keeps_the_old_one(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(Boom), atomic_dir(out) as tmp:
        (tmp / "a.bin").write_bytes(b"x")
        raise Boom
    assert not out.exists() and _leftovers(tmp_path) == []
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError), atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"] and _leftovers(tmp_path) == []
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and _leftovers(tmp_path) == []


def test_replace_dir_keeps_the_old_dir_when_the_rename_fails(tmp_path, monkeypatch):
    out, tmp = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    real_rename = Path.rename

    def rename(self, target):
        if self == tmp:
            raise OSError("simulated rename failure")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        replace_dir(tmp, out)
    assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]  # no "old" sibling left
    monkeypatch.undo()
    replace_dir(tmp, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_without_overwrite_refuses(tmp_path):
    out, tmp = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    tmp.mkdir()
    with pytest.raises(FileExistsError, match="out exists"):
        replace_dir(tmp, out, overwrite=False)
    assert out.is_dir() and tmp.is_dir()


def test_permissions_follow_the_umask(tmp_path, umask_027):
    f = tmp_path / "a.json"
    write_json_atomic(f, {"a": 1})
    assert _mode(f) == 0o640  # not tempfile's 0600
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "w.bin", 0o600)
    assert _mode(out) == 0o750 and _mode(out / "sub") == 0o750
    assert _mode(out / "sub" / "w.bin") == 0o640
    os.umask(0o022)
    write_text_atomic(f, "x")
    assert _mode(f) == 0o644


def test_hardlinked_files_keep_their_mode(tmp_path, umask_027):
    base = tmp_path / "base.bin"
    base.write_bytes(b"x")
    os.chmod(base, 0o600)
    d = tmp_path / "d"
    d.mkdir()
    os.link(base, d / "linked.bin")
    (d / "own.bin").write_bytes(b"y")
    os.chmod(d / "own.bin", 0o600)
    ordinary_permissions(d)
    assert _mode(base) == 0o600 and _mode(d / "own.bin") == 0o640


def test_json_text_and_hash_helpers(tmp_path):
    from pydantic import BaseModel

    class M(BaseModel):
        name: str
        n: int

    write_json_atomic(tmp_path / "m.json", M(name="ü", n=2))
    text = (tmp_path / "m.json").read_text(encoding="utf-8")
    assert json.loads(text) == {"name": "ü", "n": 2} and text.endswith("}\n") and "ü" in text
    data = os.urandom(3000)
    (tmp_path / "b").write_bytes(data)
    assert file_sha256(tmp_path / "b", chunk=1000) == hashlib.sha256(data).hexdigest()
    a, b = temp_sibling(tmp_path / "x", "old"), temp_sibling(tmp_path / "x", "old")
    assert a != b and a.parent == tmp_path and not a.exists() and ".old." in a.name
