"""The one output-path guard every command that writes goes through.

- ``check_output(out, inputs)``: the output may not be, contain, or lie inside any input, nor be
  (or hold) what an input links to; symlinks are resolved first, and the same file or
  directory reached by another name (bind mounts, hardlinks) counts as the same.
- ``check_writable_parent(out)``: the output's directory exists or can be made (no ancestor
  is a file, the nearest existing one is writable and not on a read-only file system).
- ``cleanup_stale_temps(out)``: remove the temporary siblings a killed run of the same
  command left behind (names from ``lens_merge.files.temp_sibling``).
- ``os_errors(path)`` / ``describe_os_error(exc)``: an ``OSError`` (disk full, read-only,
  file too large, permission denied, a parent that is a file) as one line naming the path.

Every refusal is an ``OutputError`` whose one line names both paths and how they relate.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from lens_merge.errors import OutputError
from lens_merge.files import TEMP_MARK

PathLike = str | os.PathLike
Inputs = Iterable[PathLike | None] | Mapping[str, PathLike | None]
MAX_WALK = 100_000  # entries looked at per input directory when collecting its symlinks

_RELATION = {"is": "is", "inside": "lies inside", "contains": "contains"}


def exists(path: PathLike) -> bool:
    """True when ``path`` exists or is a symlink (a dangling symlink counts as existing)."""
    return os.path.lexists(path)


def _resolve(p: PathLike, what: str) -> Path:
    try:
        return Path(p).expanduser().resolve(strict=False)
    except (OSError, RuntimeError, ValueError) as exc:
        # a symlink loop (RuntimeError before 3.13), ~user without a home, a NUL byte
        raise OutputError(f"{what} {os.fspath(p)!r}: cannot be resolved ({exc})") from None


def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = p.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _relation(out: Path, inp: Path) -> str | None:
    """How resolved ``out`` relates to resolved ``inp``: is / inside / contains / None."""
    if out == inp:
        return "is"
    if inp in out.parents:
        return "inside"
    if out in inp.parents:
        return "contains"
    # the same objects reached by other names (bind mounts, hardlinks, case-folding disks)
    o_self, i_self = _ident(out), _ident(inp)
    if o_self is not None and o_self == i_self:
        return "is"
    if i_self is not None and i_self in {_ident(a) for a in out.parents}:
        return "inside"
    if o_self is not None and o_self in {_ident(a) for a in inp.parents}:
        return "contains"
    return None


def _links_of(root: Path) -> Iterator[tuple[Path, Path]]:
    """(symlink, resolved target) for every symlink inside directory ``root``."""
    try:
        if not root.is_dir():
            return
    except OSError:  # a name too long, a parent without permission: nothing to walk
        return
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            seen += 1
            if seen > MAX_WALK:
                return
            p = Path(dirpath) / name
            if p.is_symlink():
                try:
                    yield p, p.resolve(strict=False)
                except (OSError, RuntimeError):
                    continue


def _labelled(inputs: Inputs) -> list[tuple[str, PathLike]]:
    if isinstance(inputs, Mapping):
        return [(f"the {k}", v) for k, v in inputs.items() if v is not None]
    if isinstance(inputs, (str, os.PathLike)):
        return [("the input", inputs)]
    return [("the input", v) for v in inputs if v is not None]


def _shown(p: PathLike, resolved: Path) -> str:
    return f"{p}" if Path(p).expanduser().absolute() == resolved else f"{p} (= {resolved})"


def check_output(out: PathLike, inputs: Inputs, *, what: str = "output",
                 overwrite: bool | None = None) -> Path:
    """Refuse an output path that would overwrite or hold any of the command's inputs.

    Args:
        out: the file or directory the command will write (or replace).
        inputs: the paths the command reads (files or directories; ``None`` entries are
            skipped), or a mapping label -> path (``{"checkpoint": ck}``), the label then
            naming the input in the message.
        what: how the message names the output (``output``, ``--output``, ``release``).
        overwrite: when False, an existing output (a dangling symlink included) is refused
            too; None leaves that check to the caller.

    Returns:
        The resolved output path.

    Raises:
        OutputError: one line naming both paths and the relation (``is the input``,
            ``lies inside the input``, ``contains the input``, or the same through a link
            inside the input).
    """
    out_r = _resolve(out, what)
    for label, inp in _labelled(inputs):
        inp_r = _resolve(inp, label)
        rel = _relation(out_r, inp_r)
        if rel is not None:
            raise OutputError(f"{what} {_shown(out, out_r)} {_RELATION[rel]} {label} "
                              f"{_shown(inp, inp_r)}; choose an output outside the inputs")
        for link, target in _links_of(inp_r):
            rel = _relation(out_r, target)
            if rel is not None:
                raise OutputError(f"{what} {_shown(out, out_r)} {_RELATION[rel]} {target}, "
                                  f"which {label} {inp} links to ({link}); choose an output "
                                  "outside the inputs")
    if overwrite is False and exists(out):
        raise OutputError(f"{what} {out} exists; pass --overwrite to replace it")
    return out_r


def check_writable_parent(out: PathLike, *, what: str = "output") -> Path:
    """Check that ``out``'s directory exists or can be created, and can be written.

    Args:
        out: the file or directory about to be written.
        what: how the message names the output.

    Returns:
        ``out`` as an absolute path.

    Raises:
        OutputError: an ancestor is a file (named) or a dangling symlink, or the nearest
            existing directory is read-only or not writable.
    """
    try:
        p = Path(out).expanduser().absolute()
    except RuntimeError as exc:  # ~user with no home directory
        raise OutputError(f"cannot write {what} {out}: {exc}") from None
    if "\0" in str(p):
        raise OutputError(f"cannot write {what} {out!r}: the name holds a NUL byte")
    for anc in p.parents:
        if not exists(anc):
            continue
        if anc.is_symlink() and not anc.exists():
            raise OutputError(f"cannot write {what} {out}: {anc} is a dangling symlink")
        if not anc.is_dir():
            raise OutputError(f"cannot write {what} {out}: {anc} is a file, not a directory")
        try:
            read_only = bool(os.statvfs(anc).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        if read_only:
            raise OutputError(f"cannot write {what} {out}: {anc} is on a read-only file system")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {what} {out}: directory {anc} is not writable "
                              "(permission denied)")
        break
    return p


def _temp_pattern(out: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f"{TEMP_MARK}{out.name}.") +
                      r"(?:(?P<tag>[A-Za-z0-9_-]+)\.)?[0-9a-f]{8}")


def cleanup_stale_temps(out: PathLike, *, tags: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary siblings of ``out`` that a killed run left behind.

    Only names ``lens_merge.files.temp_sibling(out, tag)`` makes are touched:
    ``<TEMP_MARK><out's name>.[<tag>.]<8 hex digits>`` in ``out``'s directory. When ``out``
    does not exist but an ``old`` sibling does (a run killed between moving the previous
    output aside and renaming the new one in), the newest ``old`` sibling is renamed back to
    ``out`` instead of being removed. Call it before the command makes its own temporaries;
    two runs writing the same output at once are not supported.

    Args:
        out: the command's output path.
        tags: the tags the command's temporaries carry (``("old",)``, the GGUF outtypes);
            None accepts any single-word tag, which also matches the temporaries of an
            output named ``<out>.<word>``: pass the tags when such siblings may be written
            at the same time.

    Returns:
        The paths removed.
    """
    out = Path(out).expanduser()
    pattern = _temp_pattern(out)
    allowed = None if tags is None else set(tags) | {"old"}
    parents = {out.parent.absolute()}
    try:
        parents.add(out.parent.resolve(strict=False))
    except (OSError, RuntimeError):
        pass
    found: list[tuple[Path, str | None]] = []
    for parent in parents:
        if not parent.is_dir():
            continue
        for entry in parent.iterdir():
            m = pattern.fullmatch(entry.name)
            if m and (allowed is None or m["tag"] is None or m["tag"] in allowed):
                found.append((entry, m["tag"]))
    if not exists(out):
        olds = sorted((p for p, tag in found if tag == "old"), key=_mtime)
        if olds:
            olds[-1].rename(out)
            found = [(p, t) for p, t in found if p != olds[-1]]
    removed = []
    for p, _ in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError:
                continue
        removed.append(p)
    return removed


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return 0.0


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EFBIG: "file too large for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a parent is a file, not a directory",
    errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EXDEV: "crosses file systems",
    errno.EIO: "input/output error",
}


def _file_ancestor(p: Path) -> Path | None:
    for anc in p.parents:
        if anc.is_file():
            return anc
    return None


def _name(p: object) -> str | None:
    if p is None:
        return None
    if isinstance(p, bytes | str | os.PathLike):
        return os.fsdecode(p)
    return str(p)


def describe_os_error(exc: OSError, path: PathLike | None = None,
                      action: str | None = "write") -> str:
    """One line for an ``OSError``: the path, the cause in words and the errno name.

    Args:
        exc: the error.
        path: the path to name when the error carries none (a write to an open file).
        action: the verb of the message (``cannot write PATH: ...``); None: ``PATH: ...``.
    """
    where = _name(exc.filename if exc.filename is not None else path)
    code = errno.errorcode.get(exc.errno or -1)
    reason = _REASONS.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOTDIR and where is not None:
        anc = _file_ancestor(Path(where))
        if anc is not None:
            reason = f"{anc} is a file, not a directory"
    extra = f" -> {_name(exc.filename2)}" if exc.filename2 is not None else ""
    suffix = f" ({code})" if code else ""
    head = f"cannot {action} " if action else ""
    if where is None:
        return f"{head.strip() or 'I/O error'}: {reason}{suffix}"
    return f"{head}{where}{extra}: {reason}{suffix}"


@contextmanager
def os_errors(path: PathLike, action: str = "write") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into an ``OutputError`` naming the path.

    Args:
        path: the output the block writes (named when the error carries no file name).
        action: the verb of the message.
    """
    try:
        yield
    except OSError as exc:
        raise OutputError(describe_os_error(exc, path, action)) from exc
