"""``export_gguf``: a folded HF checkpoint -> one GGUF file, streamed and written atomically.

The gguf package's ``GGUFWriter`` is driven as the state machine it is: every key-value and
every tensor info (shape, type, byte size, all known from the safetensors headers) first,
then the header, then the tensors one at a time as they are converted.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lens_merge.architectures import Architecture, for_config
from lens_merge.errors import ExportError
from lens_merge.export.gguf._hparams import SUPPORTED, write_hparams
from lens_merge.export.gguf._metadata import resolve_metadata, write_general
from lens_merge.export.gguf._quantize import quantize_with_llama_cpp, require_llama_cpp
from lens_merge.export.gguf._tensors import TensorPlan, iter_encoded, plan_tensors
from lens_merge.export.gguf._types import INTERMEDIATE, OUTTYPES, OutType, get_outtype
from lens_merge.export.gguf._vocab import Vocab, load_vocab
from lens_merge.files import atomic_file, file_sha256, temp_sibling
from lens_merge.guard import check_output, check_writable_parent, cleanup_stale_temps, exists
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import build_time
from lens_merge.weights.checkpoint import Checkpoint


def supported_model_types() -> list[str]:
    """HF ``model_type`` values GGUF export supports."""
    from lens_merge.architectures import get, names

    tables = [get(n) for n in names()]
    return sorted(t for a in tables if a.gguf and a.gguf.get("arch") in SUPPORTED
                  for t in a.model_types)


def gguf_architecture(cfg: dict, root: Path) -> Architecture:
    """The weight-name table of a model the GGUF exporter supports (else ExportError)."""
    try:
        arch = for_config(cfg)
    except Exception:  # noqa: BLE001 - re-raised with the GGUF list below
        arch = None
    if arch is None or not arch.gguf or arch.gguf.get("arch") not in SUPPORTED:
        raise ExportError(f"{root}: model_type {cfg.get('model_type')!r} cannot be exported to "
                          f"GGUF; supported: {', '.join(supported_model_types())}")
    return arch


def _source_dtype(ck: Checkpoint) -> str:
    """Dtype of the first 2-D tensor (the rule llama.cpp's converter uses for 'auto')."""
    for _, entries in ck.entries():
        for e in entries.values():
            if len(e.shape) == 2:
                return e.dtype
    return "F32"


def _write_file(path: Path, arch: Architecture, cfg: dict, outtype: OutType, vocab: Vocab,
                meta: dict, plans: list[TensorPlan], progress: Progress) -> None:
    import gguf

    from lens_merge import __version__

    w = gguf.GGUFWriter(path, arch.gguf["arch"])
    try:
        write_general(w, meta)
        write_hparams(w, arch.gguf["arch"], cfg)
        w.add_file_type(int(gguf.LlamaFileType[outtype.file_type]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.write(w)
        w.add_string("lens_merge.version", __version__)
        stamp = build_time()  # none unless SOURCE_DATE_EPOCH: same inputs, same bytes
        if stamp:
            w.add_string("lens_merge.created", stamp)
        for p in plans:
            w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[p.qtype])
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with progress.task(f"GGUF {outtype.label}", total=len(plans)) as task:
            for p, data in iter_encoded(plans):
                w.write_tensor_data(data)
                task.advance(1, tensor=p.name)
    finally:
        w.close()


def _readback(path: Path) -> tuple[Counter, list[tuple[str, tuple[int, ...], str]]]:
    """Tensor type histogram and (name, shape, type) rows of a written GGUF."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    rows = [(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type.name)
            for t in r.tensors]
    return Counter(t for _, _, t in rows), rows


def export_gguf(
    checkpoint: str | Path,
    out: str | Path,
    outtype: str = "f16",
    tokenizer_pre: str | None = None,
    metadata: dict | None = None,
    progress: Progress = NULL,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Export a Hugging Face checkpoint (e.g. folded after Lens) to one GGUF file.

    Args:
        checkpoint: HF model directory with safetensors weights and a tokenizer (or
            ``default`` for the embedded default model).
        out: the ``.gguf`` path to write (atomically: temporary sibling, then rename).
        outtype: one of ``f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0`` (pure Python) or
            ``q6_k, q5_k_m, q4_k_m`` (llama.cpp's quantizer, needs the ``llama`` extra).
        tokenizer_pre: force ``tokenizer.ggml.pre`` instead of detecting it.
        metadata: ``general.*`` values: name, basename, finetune, version, license,
            languages, tags, base_models=[{name, organization, repo_url}], ...; merged over
            what the checkpoint's ``lens_merge.json`` provenance implies.
        progress: progress reporter (one tick per tensor).
        overwrite: replace an existing ``out`` (atomically; the CLI asks for --overwrite).

    Returns:
        dict: path, outtype, file_type, bytes, sha256, n_tensors, n_params, tensor_types
        (type -> count), fallbacks (tensors not stored in the requested type, with why),
        tokenizer (model, pre, pre_hash, n_tokens), metadata (general values), seconds.

    Raises:
        ExportError: unsupported architecture, tokenizer or output type; unknown
            pre-tokenizer; missing extra for K-quants; an existing ``out``.
    """
    t0 = time.perf_counter()
    ot = get_outtype(outtype)
    if ot.kquant:
        require_llama_cpp(f"--outtype {ot.name}")
    out = Path(out)
    from lens_merge.models import resolve_model

    ck = Checkpoint.open(resolve_model(checkpoint))
    check_output(out, {"checkpoint": ck.root})
    check_writable_parent(out)
    cleanup_stale_temps(out, tags=list(OUTTYPES))
    if exists(out) and not overwrite:
        raise ExportError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    cfg = ck.config()
    arch = gguf_architecture(cfg, ck.root)
    src_dtype = _source_dtype(ck)
    written = get_outtype(INTERMEDIATE.get(src_dtype, "f32")) if ot.kquant else ot
    plans = plan_tensors(ck, arch, cfg, written)
    vocab = load_vocab(ck.root, int(cfg["vocab_size"]), tokenizer_pre)
    n_params = sum(int(np.prod(p.shape)) for p in plans)
    meta = resolve_metadata(ck.root, metadata, n_params)
    with atomic_file(out) as final:  # renamed over ``out`` only once complete
        if not ot.kquant:
            _write_file(final, arch, cfg, written, vocab, meta, plans, progress)
        else:
            lossless = temp_sibling(out, written.name)
            try:
                _write_file(lossless, arch, cfg, written, vocab, meta, plans, progress)
                with progress.task(f"llama.cpp quantize {ot.label}", total=1) as task:
                    quantize_with_llama_cpp(lossless, final, ot)
                    task.advance()
            finally:
                lossless.unlink(missing_ok=True)
    if ot.kquant:  # llama.cpp chose the per-tensor types: read them back
        types, rows = _readback(out)
        fallbacks = [{"tensor": n, "shape": list(s), "wanted": ot.label, "used": t,
                      "reason": f"row length {s[-1]} is not a multiple of 256 (llama.cpp's "
                                "K-quant block); llama.cpp chose the fallback type"}
                     for n, s, t in rows if len(s) == 2 and s[-1] % 256 and "_K" not in t]
    else:
        types = Counter(p.qtype for p in plans)
        rows = plans
        fallbacks = [{"tensor": p.name, "shape": list(p.shape), "wanted": ot.ggml,
                      "used": p.qtype, "reason": p.fallback} for p in plans if p.fallback]
    return {
        "path": str(out), "outtype": ot.name, "label": ot.label,
        "file_type": ot.file_type, "source_dtype": src_dtype,
        "intermediate": written.name if ot.kquant else None,
        "bytes": out.stat().st_size, "sha256": file_sha256(out),
        "n_tensors": len(rows), "n_params": n_params, "tensor_types": dict(types),
        "fallbacks": fallbacks,
        "tokenizer": {"model": vocab.model, "pre": vocab.pre, "pre_hash": vocab.pre_hash,
                      "n_tokens": len(vocab.tokens), "chat_template": bool(vocab.chat_template)},
        "architecture": arch.gguf["arch"], "metadata": meta,
        "seconds": round(time.perf_counter() - t0, 3),
    }
