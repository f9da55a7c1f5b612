"""Checking a safetensors header against the file it heads, before anything trusts it.

``read_safetensors_header(path)`` is the one reader of safetensors headers: every way a header
or file can be wrong (short, not UTF-8, not a JSON object, bad entries, unknown dtypes,
offsets outside the file, gaps or overlaps, a size other than the header promises) becomes one
``LensMergeError`` line naming the file and the cause.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from lens_merge.errors import LensMergeError, ModelError

MAX_HEADER = 100_000_000  # the safetensors reader's own limit on the JSON header
MAX_RANK = 64  # dimensions a stored tensor may have
USIZE_MAX = 2**64 - 1  # the reader's element counts and offsets are 64-bit

# Bytes per element of each safetensors dtype string.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

Error = type[LensMergeError]


def read_safetensors_header(path: str | Path, error: Error = ModelError) -> tuple[dict, int]:
    """Read and check a safetensors header against the file it heads.

    Checked: the 8-byte length (sane, inside the file), UTF-8, a JSON object, every entry's
    ``dtype`` (known), ``shape`` (non-negative integers) and ``data_offsets`` (consistent with
    shape x dtype size, packed without gaps or overlaps), ``__metadata__`` (a str -> str
    object), and the file size against the header's promise.

    Args:
        path: a ``.safetensors`` file.
        error: the ``LensMergeError`` subclass to raise (``DeltaError`` for a delta).

    Returns:
        (header dict, byte offset where the data section starts).

    Raises:
        ModelError (or ``error``): one line naming the file and what is wrong with it;
            a short file says ``truncated: header promises N bytes, file has M``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) != 8:
                raise error(f"{path}: not a safetensors file ({size} bytes, shorter than the "
                            "8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > MAX_HEADER:
                raise error(f"{path}: not a safetensors file (header length {n})")
            if n > size - 8:
                raise error(f"{path}: truncated: header promises at least {8 + n} bytes, file "
                            f"has {size}")
            raw = fh.read(n)
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a safetensors file") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    header = _parse_header(raw, path, error)
    end = _check_entries(header, path, error)
    promised = 8 + n + end
    if size < promised:
        raise error(f"{path}: truncated: header promises {promised} bytes, file has {size}")
    if size > promised:
        raise error(f"{path}: has {size} bytes, but its header promises {promised} "
                    "(trailing data; not a safetensors file this tool wrote or can trust)")
    return header, 8 + n


def _parse_header(raw: bytes, path: Path, error: Error) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: safetensors header is not UTF-8 (byte {8 + exc.start})") from None
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: corrupt safetensors header (invalid JSON: {exc.msg} at "
                    f"column {exc.colno})") from None
    except RecursionError:
        raise error(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                    "expected an object)")
    return header


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(name: str, info: Any, path: Path, error: Error) -> tuple[int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise error(f"{where}: header entry is a {type(info).__name__}, expected an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise error(f"{where}: dtype {dtype!r} unknown (expected one of "
                    f"{', '.join(DTYPE_SIZES)})")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(_is_int(d) and 0 <= d <= USIZE_MAX for d in shape)):
        raise error(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
            or not 0 <= offsets[0] <= offsets[1]):
        raise error(f"{where}: data_offsets {offsets!r} is not [begin, end] with "
                    "0 <= begin <= end")
    count = 1
    for d in shape:  # as the safetensors reader does: overflow-checked, in order
        count *= d
        if count > USIZE_MAX:
            raise error(f"{where}: shape {shape} overflows a 64-bit element count")
    if count * DTYPE_SIZES[dtype] != offsets[1] - offsets[0]:
        raise error(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                    f"shape {shape} x {dtype} needs {count * DTYPE_SIZES[dtype]}")
    return offsets[0], offsets[1]


def _check_entries(header: dict, path: Path, error: Error) -> int:
    """Check every entry and the packing of the data section; returns its length."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise error(f"{path}: __metadata__ is not an object of strings")
    spans = sorted((*_check_entry(k, v, path, error), k)
                   for k, v in header.items() if k != "__metadata__")
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise error(f"{path}: tensor {name!r} (bytes {begin}-{end}) overlaps tensor "
                        f"{prev!r}")
        if begin > pos:
            raise error(f"{path}: gap in the data before tensor {name!r} (starts at {begin}, "
                        f"expected {pos})")
        pos, prev = end, name
    return pos
