"""The training cache on disk: a folder of safetensors shards, read per batch through mmap.

Layout of ``cache/<key16>/``:

- ``rows-<i>-of-<P>.safetensors``: the rows one process built. Per language ``x.<lang>``, the
  unpadded stream entering block N-K of every row laid end to end ``[tokens, d]`` fp32, with
  ``offsets.<lang>`` ``[rows+1]`` int64 (row j is ``x[offsets[j]:offsets[j+1]]``);
  ``ref_last`` ``[rows, L, d]``, ``ref_mean_en`` ``[rows, d]``, ``ref_logp_en`` ``[rows, V]``
  fp32 (the base's next-token log-probabilities at the last English token, the whole
  vocabulary: V*4 bytes a row, a few percent of the row's stream for an 8B model with a 128k
  vocabulary) and ``rows`` ``[rows]`` int64, the rows' global indices. With the base's
  English replies (``train.lambda_kl_replies``): ``x.reply``/``offsets.reply`` laid out as a
  language (prompt + reply without its last token) and ``reply_len`` ``[rows]`` int64.
- ``cache.json`` (:class:`CacheMeta`): the format version, the languages, the first block, the
  number of rows and, per shard, its file, its rows and the process that built it. It is
  written last: a folder is complete when it has one, and folders only appear by a rename
  (an interrupted build leaves a temporary sibling that is never read).

Any reader finds any row through the meta, so a cache built by one process serves P processes
and the other way round (on a filesystem they share).

Format versions: 1 had no ``ref_logp_en``; such a folder is refused by ``read_meta`` (the
cache key changed with it too, so a version-2 build never lands in a version-1 folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

from lens_merge.errors import DataError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
META_NAME = "cache.json"
REPLY_KEY = "reply"  # x.reply / offsets.reply: the English prompts with the base's replies


class CacheRows(Protocol):
    """What a shard is written from (``lens_merge.lens.train.cache.LensCache``)."""

    languages: list[str]
    first_block: int
    x: dict[str, list[torch.Tensor]]
    ref_last: torch.Tensor
    ref_mean_en: torch.Tensor
    meta: dict[str, Any]
    ref_logp_en: torch.Tensor | None
    x_reply: list[torch.Tensor] | None
    reply_len: list[int] | None

    def row_ids(self) -> list[int]: ...


class Shard(BaseModel):
    """One shard file and the global rows it holds, in its order."""

    model_config = ConfigDict(extra="forbid")
    file: str
    rows: list[int]
    rank: int = 0  # the process that built it


class CacheMeta(BaseModel):
    """``cache.json``: what the folder holds."""

    model_config = ConfigDict(extra="forbid")
    format_version: int
    languages: list[str]
    first_block: int
    n_rows: int
    shards: list[Shard]
    build: dict[str, Any] = {}


def shard_name(index: int, count: int) -> str:
    """File name of shard ``index`` of ``count``."""
    return f"rows-{index:05d}-of-{count:05d}.safetensors"


def is_complete(folder: str | Path) -> bool:
    """Whether ``folder`` is a finished cache (its meta is written last)."""
    return (Path(folder) / META_NAME).is_file()


def write_shard(cache: CacheRows, path: str | Path) -> None:
    """Write the rows of an in-memory cache as one shard file (atomically).

    Raises:
        DataError: when the cache has no ``ref_logp_en`` (every built cache has one).
    """
    import torch
    from safetensors.torch import save_file

    from lens_merge.files import atomic_file

    tensors: dict[str, torch.Tensor] = {}
    streams = {lang: cache.x[lang] for lang in cache.languages}
    if cache.x_reply is not None and cache.reply_len is not None:
        streams[REPLY_KEY] = cache.x_reply
        tensors["reply_len"] = torch.tensor(cache.reply_len, dtype=torch.int64)
    for lang, seqs in streams.items():
        lens = torch.tensor([0] + [s.shape[0] for s in seqs], dtype=torch.int64)
        tensors[f"x.{lang}"] = torch.cat(seqs).float().contiguous()
        tensors[f"offsets.{lang}"] = lens.cumsum(0)
    tensors["ref_last"] = cache.ref_last.float().contiguous()
    tensors["ref_mean_en"] = cache.ref_mean_en.float().contiguous()
    if cache.ref_logp_en is None:
        raise DataError(f"{path}: the cache has no ref_logp_en (build it with build_cache)")
    tensors["ref_logp_en"] = cache.ref_logp_en.float().contiguous()
    tensors["rows"] = torch.tensor(cache.row_ids(), dtype=torch.int64)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format_version": str(FORMAT_VERSION)})


def write_meta(folder: str | Path, cache: CacheRows, n_rows: int,
               shards: list[Shard]) -> None:
    """Write ``cache.json`` into ``folder`` (last step of a build)."""
    from lens_merge.files import write_json_atomic

    meta = CacheMeta(format_version=FORMAT_VERSION, languages=list(cache.languages),
                     first_block=cache.first_block, n_rows=n_rows, shards=shards,
                     build={k: v for k, v in cache.meta.items() if k != "n_rows"})
    write_json_atomic(Path(folder) / META_NAME, meta.model_dump())


def read_meta(folder: str | Path) -> CacheMeta:
    """Read and check a cache folder's ``cache.json``."""
    p = Path(folder) / META_NAME
    try:
        meta = CacheMeta.model_validate_json(p.read_text())
    except OSError as exc:
        raise DataError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise DataError(f"{p}: not a training-cache meta ({exc})") from None
    if meta.format_version != FORMAT_VERSION:
        raise DataError(f"{p}: format_version {meta.format_version}, expected "
                        f"{FORMAT_VERSION}; remove the folder to rebuild the cache")
    return meta


class DiskCache:
    """The cache read per batch from memory-mapped shards; same ``collate`` as ``LensCache``.

    Only the offsets and row ids are read at open; ``collate`` slices the rows it is asked
    for out of the mapped files, so memory holds one batch, never the whole cache.
    """

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        m = read_meta(self.folder)
        self.languages, self.first_block, self.meta = m.languages, m.first_block, m.build
        self.n_rows, self.shards = m.n_rows, m.shards
        self._files, self._offsets, self._reply_len = [], [], []
        self._where: dict[int, tuple[int, int]] = {}  # row -> (shard, position)
        self.has_replies = bool(m.build.get("reply_tokens"))
        streams = self.languages + ([REPLY_KEY] if self.has_replies else [])
        for s, sh in enumerate(m.shards):
            f = safe_open(str(self.folder / sh.file), framework="pt")
            rows = f.get_tensor("rows").tolist()
            if rows != sh.rows:
                raise DataError(f"{self.folder / sh.file}: tensor 'rows' differs from "
                                f"{META_NAME}'s rows for it; remove the folder to rebuild")
            if self.has_replies and "reply_len" not in f.keys():  # noqa: SIM118 - safe_open
                raise DataError(f"{self.folder / sh.file}: {META_NAME} says the cache holds "
                                "English replies but the shard has no 'reply_len'; remove "
                                "the folder to rebuild")
            self._files.append(f)
            self._offsets.append({lang: f.get_tensor(f"offsets.{lang}").tolist()
                                  for lang in streams})
            self._reply_len.append(f.get_tensor("reply_len").tolist()
                                   if self.has_replies else [])
            for j, r in enumerate(rows):
                self._where.setdefault(r, (s, j))
        missing = sorted(set(range(self.n_rows)) - set(self._where))
        if missing:
            raise DataError(f"{self.folder}: rows {missing[:8]} are in no shard; remove the "
                            "folder to rebuild the cache")

    def __len__(self) -> int:
        return self.n_rows

    def _x(self, lang: str, row: int) -> torch.Tensor:
        s, j = self._where[row]
        off = self._offsets[s][lang]
        return self._files[s].get_slice(f"x.{lang}")[off[j]:off[j + 1]]

    def _ref(self, name: str, row: int) -> torch.Tensor:
        s, j = self._where[row]
        return self._files[s].get_slice(name)[j:j + 1]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Left-pad the rows ``idx`` of every language into one batch, language-major.

        Returns:
            ``x`` [L*B, T, d], ``mask`` [L*B, T], ``ref_last`` [B, L, d],
            ``ref_mean_en`` [B, d], ``ref_logp_en`` [B, V], ``index`` [B]; with replies
            ``x_reply``, ``mask_reply``, ``reply_len`` (as ``LensCache.collate``).
        """
        import torch

        seqs = [self._x(lang, i) for lang in self.languages for i in idx]
        x, mask = pad_batch(seqs)
        refs = {k: torch.cat([self._ref(k, i) for i in idx])
                for k in ("ref_last", "ref_mean_en", "ref_logp_en")}
        out = {"x": x, "mask": mask, **refs, "index": torch.tensor(idx)}
        if self.has_replies:
            xr, mr = pad_batch([self._x(REPLY_KEY, i) for i in idx])
            lens = [self._reply_len[self._where[i][0]][self._where[i][1]] for i in idx]
            out |= {"x_reply": xr, "mask_reply": mr, "reply_len": torch.tensor(lens)}
        return out


def pad_batch(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``[T_i, d]`` sequences with zeros: ``x`` [n, T, d] and ``mask`` [n, T]."""
    import torch

    T = max(s.shape[0] for s in seqs)
    d = seqs[0].shape[1]
    x = seqs[0].new_zeros((len(seqs), T, d))
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for j, s in enumerate(seqs):
        x[j, T - s.shape[0]:] = s
        mask[j, T - s.shape[0]:] = 1
    return x, mask


def own_columns(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded rows ``x`` [B, T, d] and ``mask`` [B, T] without the leading columns that
    are padding in every row (positions count from each row's first token: unchanged)."""
    t = max(int(mask.sum(1).max()), 1)
    return x[:, -t:], mask[:, -t:]
