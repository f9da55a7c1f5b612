"""The output-path guard: outputs never are, hold or lie inside an input; stale temps go."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from lens_merge.errors import LensMergeError, OutputError
from lens_merge.files import TEMP_MARK, atomic_dir, temp_sibling
from lens_merge.guard import (
    check_output,
    check_writable_parent,
    cleanup_stale_temps,
    describe_os_error,
    exists,
    os_errors,
)


@pytest.fixture
def ck(tmp_path) -> Path:
    """A checkpoint-shaped input directory with two shards."""
    d = tmp_path / "f1"
    d.mkdir()
    for i in (1, 2):
        (d / f"model-0000{i}-of-00002.safetensors").write_bytes(b"x" * 16)
    (d / "config.json").write_text("{}")
    return d


def _refused(out, inputs, relation: str, **kw) -> str:
    with pytest.raises(OutputError) as e:
        check_output(out, inputs, **kw)
    msg = str(e.value)
    assert relation in msg and "\n" not in msg
    assert isinstance(e.value, LensMergeError)
    return msg


# ----------------------------------------------------------------------------- relations


def test_export_onnx_into_the_checkpoint_itself(ck):
    """Reproduction: ``export onnx W/f1 -o W/f1 --overwrite`` destroyed the checkpoint."""
    msg = _refused(ck, [ck], "is the input")
    assert msg.count(str(ck)) == 2
    assert sorted(p.name for p in ck.iterdir())[0] == "config.json"


def test_gguf_onto_a_shard_inside_the_checkpoint(ck):
    """Reproduction: ``export gguf W/f2 -o W/f2/model-00002-of-00002.safetensors``."""
    shard = ck / "model-00002-of-00002.safetensors"
    msg = _refused(shard, [ck], "lies inside the input")
    assert str(shard) in msg and str(ck) in msg


def test_output_containing_an_input(tmp_path, ck):
    _refused(tmp_path, {"checkpoint": ck}, "contains the checkpoint")


def test_new_file_inside_an_input_directory(ck):
    _refused(ck / "sub" / "new.gguf", [ck], "lies inside the input")


def test_unrelated_and_sibling_outputs_pass(tmp_path, ck):
    assert check_output(tmp_path / "f1-out", [ck]) == (tmp_path / "f1-out").resolve()
    assert check_output(tmp_path / "f", [ck, None]) == (tmp_path / "f").resolve()
    (tmp_path / "f1.gguf").write_bytes(b"")
    check_output(tmp_path / "f1.gguf", {"checkpoint": ck, "delta": None})


def test_single_path_and_file_inputs(tmp_path, ck):
    _refused(ck, ck, "is the input")
    f = tmp_path / "a.gguf"
    f.write_bytes(b"g")
    _refused(f, [f], "is the input")


def test_relative_paths(tmp_path, ck, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused("f1", [ck], "is the input")
    _refused("./f1/../f1/x", ["f1"], "lies inside the input")
    _refused(".", ["f1"], "contains the input")
    check_output("other", ["f1"])


def test_symlinked_output_is_resolved(tmp_path, ck):
    link = tmp_path / "link"
    link.symlink_to(ck)
    msg = _refused(link, [ck], "is the input")
    assert f"(= {ck})" in msg  # the message shows what the link resolves to
    _refused(link / "model.gguf", [ck], "lies inside the input")


def test_symlinked_input_is_resolved(tmp_path, ck):
    link = tmp_path / "alias"
    link.symlink_to(ck)
    _refused(ck, [link], "is the input")
    _refused(tmp_path, [link], "contains the input")


def test_dangling_symlink_output(tmp_path, ck):
    """A dangling symlink exists: it resolves to where the write would land."""
    dangling = tmp_path / "dangling"
    dangling.symlink_to(ck / "not-yet.gguf")
    assert exists(dangling) and not dangling.exists()
    _refused(dangling, [ck], "lies inside the input")
    elsewhere = tmp_path / "dangling2"
    elsewhere.symlink_to(tmp_path / "nowhere")
    check_output(elsewhere, [ck])
    _refused(elsewhere, [ck], "exists", overwrite=False)


def test_existing_output_needs_overwrite(tmp_path, ck):
    out = tmp_path / "out"
    out.mkdir()
    _refused(out, [ck], "exists; pass --overwrite", overwrite=False)
    check_output(out, [ck], overwrite=True)
    check_output(tmp_path / "new", [ck], overwrite=False)


def test_output_is_what_a_link_inside_the_input_points_to(tmp_path):
    """An HF cache snapshot links its files to blobs: overwriting a blob changes the input."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_bytes(b"weights")
    snap = tmp_path / "snapshot"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(blobs / "abc")
    msg = _refused(blobs / "abc", [snap], "is")
    assert "links to" in msg and "model.safetensors" in msg
    _refused(blobs, [snap], "contains")
    check_output(tmp_path / "out", [snap])


def test_bind_mount_like_alias_by_inode(tmp_path, ck):
    """The same file under another name (a hardlink) counts as the input."""
    f = ck / "config.json"
    alias = tmp_path / "config-alias.json"
    os.link(f, alias)
    _refused(alias, [f], "is the input")


def test_symlink_loop_is_a_clean_error(tmp_path, ck):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OutputError, match="cannot be resolved"):
        check_output(a / "x", [ck])


# ----------------------------------------------------------------------------- parents


def test_parent_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match=rf"{f} is a file, not a directory"):
        check_writable_parent(f / "sub" / "out.gguf")


def test_parent_creatable_and_dangling_parent(tmp_path):
    assert check_writable_parent(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    d = tmp_path / "gone"
    d.symlink_to(tmp_path / "missing")
    with pytest.raises(OutputError, match="dangling symlink"):
        check_writable_parent(d / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_parent_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_writable_parent(ro / "out")
    finally:
        ro.chmod(0o755)


def test_parent_not_writable_as_seen_by_access(tmp_path, monkeypatch):
    """The same refusal where the test runs as root (``os.access`` says no)."""
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(OutputError, match=rf"directory {tmp_path} is not writable"):
        check_writable_parent(tmp_path / "out")


# ----------------------------------------------------------------------------- stale temps


def test_cleanup_removes_only_this_outputs_temps(tmp_path):
    out = tmp_path / "model"
    mine = [temp_sibling(out), temp_sibling(out, "old"), temp_sibling(out, "f16")]
    mine[0].mkdir()
    (mine[0] / "shard").write_bytes(b"half")
    mine[1].write_bytes(b"")
    mine[2].write_bytes(b"")
    others = [temp_sibling(tmp_path / "model2"), temp_sibling(tmp_path / "other"),
              tmp_path / f"{TEMP_MARK}model.notahexname", tmp_path / "model.keep",
              tmp_path / f"x{TEMP_MARK}model.0123abcd"]
    for p in others:
        p.write_bytes(b"keep")
    out.mkdir()
    removed = cleanup_stale_temps(out)
    assert sorted(removed) == sorted(mine)
    assert all(p.exists() for p in others) and out.is_dir()


def test_cleanup_with_tags_keeps_other_tags(tmp_path):
    out = tmp_path / "m.gguf"
    keep = temp_sibling(out, "v2")  # could be the temp of an output named m.gguf.v2
    drop = temp_sibling(out, "q8_0")
    for p in (keep, drop, temp_sibling(out)):
        p.write_bytes(b"")
    removed = cleanup_stale_temps(out, tags=["q8_0", "f16"])
    assert drop in removed and keep.exists() and len(removed) == 2


def test_cleanup_restores_an_output_moved_aside(tmp_path):
    """Killed between moving the old output aside and renaming the new one in."""
    out = tmp_path / "release"
    old = temp_sibling(out, "old")
    old.mkdir()
    (old / "keep.txt").write_text("previous")
    new = temp_sibling(out)
    new.mkdir()
    removed = cleanup_stale_temps(out)
    assert removed == [new]
    assert (out / "keep.txt").read_text() == "previous"


def test_cleanup_of_a_killed_atomic_dir(tmp_path):
    out = tmp_path / "delta"

    class Killed(BaseException):
        pass

    with pytest.raises(Killed), atomic_dir(out) as tmp:
        (tmp / "x").write_text("half")
        leftover = tmp
        raise Killed
    assert not leftover.exists()  # atomic_dir cleans up after itself ...
    leftover.mkdir()  # ... a SIGKILL does not: the next run removes it
    assert cleanup_stale_temps(out) == [leftover]
    assert cleanup_stale_temps(tmp_path / "missing-dir" / "x") == []


# ----------------------------------------------------------------------------- OS errors


@pytest.mark.parametrize("code, words", [
    (errno.ENOSPC, "no space left on device (ENOSPC)"),
    (errno.EROFS, "read-only file system (EROFS)"),
    (errno.EFBIG, "file too large for the file system (EFBIG)"),
    (errno.EACCES, "permission denied (EACCES)"),
])
def test_os_errors_name_the_path(tmp_path, code, words):
    out = tmp_path / "out.gguf"
    with pytest.raises(OutputError) as e, os_errors(out):
        raise OSError(code, os.strerror(code))  # a write on an open file: no file name
    assert str(e.value) == f"cannot write {out}: {words}"
    err = OSError(code, os.strerror(code), str(tmp_path / "named"))
    assert str(tmp_path / "named") in describe_os_error(err, out)


def test_parent_is_a_file_os_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match=rf"{f} is a file, not a directory \(ENOTDIR\)"):
        with os_errors(f / "out"):
            (f / "out").mkdir(parents=True)
