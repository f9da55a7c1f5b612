"""A streaming safetensors writer: header first, then each tensor's bytes in order.

Used by ``lens_merge.weights.fold`` to rewrite a shard while holding one tensor at a time.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from lens_merge.errors import FoldError

COPY_CHUNK = 1 << 24


class ShardWriter:
    """Writes one safetensors file whose header is fixed up front, one tensor at a time.

    A small state machine: the header is written on open; tensors must then arrive in
    data-offset order with exactly their declared size; ``close`` refuses a file with missing
    tensors. Nothing is buffered beyond the tensor being written.
    """

    def __init__(self, path: Path, header: dict) -> None:
        tensors = [(k, v) for k, v in header.items() if k != "__metadata__"]
        tensors.sort(key=lambda kv: kv[1]["data_offsets"][0])
        self._order = [(k, v["data_offsets"][0], v["data_offsets"][1]) for k, v in tensors]
        self._next = 0
        self._pos = 0
        self.path = path
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data section starts 8-aligned
        self._fh = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()/abort()
        self._header_len = len(raw)
        self._write_all(memoryview(struct.pack("<Q", len(raw)) + raw))

    def _expect(self, name: str, nbytes: int) -> None:
        if self._fh is None:
            raise FoldError(f"{self.path}: writer already closed; cannot write {name}")
        if self._next >= len(self._order):
            raise FoldError(f"{self.path}: tensor {name} is not in the header")
        want, begin, end = self._order[self._next]
        if name != want:
            raise FoldError(f"{self.path}: tensor {name} written out of order (expected {want})")
        if begin != self._pos or end - begin != nbytes:
            raise FoldError(f"{self.path}: tensor {name} has {nbytes} bytes, header says "
                            f"{end - begin} at offset {begin}")

    def write(self, name: str, data) -> None:
        """Write one tensor's bytes (a bytes-like object)."""
        mv = memoryview(data).cast("B")
        self._expect(name, mv.nbytes)
        self._write_all(mv)
        self._pos += mv.nbytes
        self._next += 1

    def _write_all(self, mv: memoryview) -> None:
        while mv.nbytes:  # an unbuffered write may take only part of the bytes
            n = self._fh.write(mv)
            mv = mv[n:]

    def copy_from(self, name: str, src, begin: int, nbytes: int) -> None:
        """Copy one tensor's stored bytes from an open source file.

        The kernel copies them (``copy_file_range``) where it can, so they never pass through
        this process's memory; otherwise they are copied in 16 MiB chunks.
        """
        self._expect(name, nbytes)
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(src.fileno(), self._fh.fileno(), nbytes - done,
                                           begin + done)
                    if n == 0:
                        break
                    done += n
            except OSError:  # unsupported here (old kernel, some filesystems): plain copy
                self._fh.seek(8 + self._header_len + self._pos + done)
        src.seek(begin + done)
        while done < nbytes:
            chunk = src.read(min(COPY_CHUNK, nbytes - done))
            if not chunk:
                raise FoldError(f"{getattr(src, 'name', 'source')}: truncated at tensor {name}")
            self._write_all(memoryview(chunk))
            done += len(chunk)
        self._pos += nbytes
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            self.abort()
            raise FoldError(f"{self.path}: closed before tensor {missing} was written")
        self._fh.close()
        self._fh = None

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write float tensors to one safetensors file with a deterministic header (tensors and
    metadata keys sorted), so the same tensors always give the same bytes.

    ``safetensors.torch.save_file`` keeps ``__metadata__`` in a hash map whose order changes
    from run to run; this writer does not.
    """
    import torch

    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    pos, data = 0, []
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        dt = str(t.dtype).split(".")[-1]
        if dt not in _DTYPES:
            raise FoldError(f"{path}: tensor {name} has dtype {dt}; expected one of "
                            f"{', '.join(_DTYPES)}")
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": _DTYPES[dt], "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
        data.append((name, raw))
    w = ShardWriter(Path(path), header)
    try:
        for name, raw in data:
            w.write(name, raw)
    except BaseException:
        w.abort()
        raise
    w.close()
