"""A probe's language direction as a llama.cpp control vector GGUF.

The probe (``lens.probe.Subspace``) holds, for every layer k, the direction
``delta_l = P_s(m_l - m_en)`` of each language: layer k is the output of block k (HF
``hidden_states[k + 1]``; the last layer is taken after the final norm). llama.cpp adds
``direction.N`` of a control vector to the output of block N (0-based) and keeps no vector for
block 0, so the probe's layer k is written as ``direction.k`` unchanged; a test pins this
numbering (one-hot direction in llama.cpp vs a transformers forward hook on block k).

The direction is added after every block of the range, so its effect compounds over the
layers: useful run-time scales are well below 1 (see ``DEFAULT_SCALES``).

File layout (what llama.cpp's ``--control-vector`` loader reads): ``general.architecture =
controlvector``, ``controlvector.model_hint`` (the base's GGUF architecture),
``controlvector.layer_count``, float32 tensors ``direction.N`` of length n_embd.

- ``export_control_vector``: write the file; ``read_control_vector``: read one back.
- ``verify_control_vector``: llama.cpp with the vector vs transformers with the same vector
  added by forward hooks (limits: ``parity.thresholds.THRESHOLDS["control_vector"]``).
- ``control_vector_effect``: share of replies in the language at several scales
  (``control_vector_effects``: several vectors, one model load, the unsteered replies once).
(The engines' work is in ``adapters._cv_check``.)
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from lens_merge.adapters._cv_check import (
    ARCH,
    KEY_COUNT,
    KEY_HINT,
    ControlVector,
    read_control_vector,
)
from lens_merge.errors import AdapterError
from lens_merge.progress import NULL, Progress

# Run-time multipliers of the effect table. The direction is added after every block of the
# range, so its effect compounds: on the default model (layers 1-28) 0.1 already turns most
# replies to English prompts into the language, and 0.5 breaks the text.
DEFAULT_SCALES = (0.05, 0.1, 0.2)

__all__ = ["ControlVector", "control_vector_effect", "control_vector_effects", "default_layers",
           "export_control_vector", "parse_layers", "read_control_vector",
           "verify_control_vector"]


def default_layers(n_layers: int) -> tuple[int, int]:
    """Layers 1..n-2: llama.cpp never steers block 0, and the probe's last layer is measured
    after the final norm (another scale than the residual stream the vector is added to)."""
    return 1, n_layers - 2


def parse_layers(spec: str | tuple[int, int] | None, n_layers: int) -> tuple[int, int]:
    """``"A-B"`` (inclusive; a single ``"A"`` is A-A) or a pair -> (A, B), checked.

    Raises:
        AdapterError: malformed, reversed, or outside 1..n_layers-2 (saying why).
    """
    if spec is None:
        lo, hi = default_layers(n_layers)
    elif isinstance(spec, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec)
        if not m:
            raise AdapterError(f"layers {spec!r}: expected A-B (e.g. 8-20), 0-based block indices")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    else:
        lo, hi = int(spec[0]), int(spec[1])
    if lo > hi:
        raise AdapterError(f"layers {lo}-{hi}: the first layer is after the last")
    if lo < 1:
        raise AdapterError(f"layers {lo}-{hi}: llama.cpp adds no control vector to layer 0 "
                           "(the first block's output); start at 1")
    if hi > n_layers - 2:
        raise AdapterError(f"layers {lo}-{hi}: the probe has layers 0..{n_layers - 1}, and its "
                           f"last ({n_layers - 1}) is measured after the final norm, so it cannot "
                           f"steer the residual stream; end at {n_layers - 2} at most")
    return lo, hi


def _model_hint(sub, given: str | None) -> str:
    if given:
        return given
    from lens_merge.architectures import for_config
    from lens_merge.weights.checkpoint import Checkpoint

    path = ((sub.meta.get("model") or {}).get("path")) if isinstance(sub.meta, dict) else None
    try:
        arch = for_config(Checkpoint.open(path, check=False).config()) if path else None
    except Exception:  # noqa: BLE001 - any failure here only means "ask the user"
        arch = None
    if arch is None or not arch.gguf:
        raise AdapterError("cannot tell the probed model's GGUF architecture (the subspace's "
                           "model path is gone or unsupported); pass model_hint= (--model-hint), "
                           "e.g. llama")
    return str(arch.gguf["arch"])


def export_control_vector(
    subspace_dir: str | Path,
    out_path: str | Path,
    language: str,
    *,
    layers: str | tuple[int, int] | None = None,
    scale: float = 1.0,
    model_hint: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the probe's direction of ``language`` as a llama.cpp control vector GGUF.

    Args:
        subspace_dir: a probe output (``subspace.json`` + ``subspace.safetensors``).
        out_path: the ``.gguf`` to write (atomically).
        language: a language of the subspace other than English (English's direction is 0).
        layers: ``"A-B"`` (inclusive, the probe's layer = block index); default 1..n-2.
        scale: multiplies every direction (baked into the file; llama.cpp's
            ``--control-vector-scaled F S`` multiplies again at run time).
        model_hint: ``controlvector.model_hint``; default: the probed model's GGUF arch.
        overwrite: replace an existing ``out_path``.

    Returns:
        dict: path, language, layers [A, B], scale, model_hint, n_embd, layer_count, norms
        (layer -> ||direction||), bytes, sha256, seconds.

    Raises:
        AdapterError: a language not in the subspace (the ones it has named), English,
            bad layers, an unknown model hint, a non-finite direction, an existing output.
        DeltaError: the directory is not a probe output.
    """
    import gguf

    from lens_merge import __version__
    from lens_merge.files import atomic_file, file_sha256
    from lens_merge.guard import check_output, check_writable_parent, cleanup_stale_temps, exists
    from lens_merge.lens.probe import Subspace

    t0 = time.perf_counter()
    sub = Subspace.load(subspace_dir)
    if language not in sub.languages:
        raise AdapterError(f"{subspace_dir}: language {language!r} is not in the subspace; it "
                           f"has {', '.join(sub.languages)}")
    if language == sub.languages[0]:
        raise AdapterError(f"{language!r} is the subspace's reference language: its direction is "
                           f"zero; choose one of {', '.join(sub.languages[1:])}")
    if not np.isfinite(float(scale)) or float(scale) == 0.0:
        raise AdapterError(f"scale must be a finite non-zero number, got {scale!r}")
    lo, hi = parse_layers(layers, len(sub.layers))
    hint = _model_hint(sub, model_hint)
    out = Path(out_path)
    check_output(out, {"subspace": Path(subspace_dir)})
    check_writable_parent(out)
    cleanup_stale_temps(out)
    if exists(out) and not overwrite:
        raise AdapterError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    dirs = {k: (sub.delta_of(language, k).double() * float(scale)).float().numpy()
            for k in range(lo, hi + 1)}
    bad = [k for k, v in dirs.items() if not np.isfinite(v).all()]
    if bad:
        raise AdapterError(f"{subspace_dir}: the direction of {language!r} holds NaN or Inf at "
                           f"layer(s) {bad}")
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            w.add_string(KEY_HINT, hint)
            w.add_uint32(KEY_COUNT, len(dirs))
            w.add_string("lens_merge.version", __version__)
            w.add_string("lens_merge.language", language)
            w.add_string("lens_merge.layers", f"{lo}-{hi}")
            w.add_float32("lens_merge.scale", float(scale))
            w.add_string("lens_merge.subspace_sha256", sub.sha256)
            for k, v in dirs.items():
                w.add_tensor(f"direction.{k}", np.ascontiguousarray(v, dtype=np.float32))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return {"path": str(out), "language": language, "layers": [lo, hi], "scale": float(scale),
            "model_hint": hint, "n_embd": int(next(iter(dirs.values())).size),
            "layer_count": len(dirs),
            "norms": {str(k): float(np.linalg.norm(v)) for k, v in dirs.items()},
            "bytes": out.stat().st_size, "sha256": file_sha256(out),
            "seconds": round(time.perf_counter() - t0, 3)}


def verify_control_vector(
    checkpoint: str | Path,
    gguf_model: str | Path,
    cv_path: str | Path,
    *,
    strength: float = 1.0,
    languages: list[str] | None = None,
    prompts: list[str] | None = None,
    prompts_per_language: int = 1,
    max_new_tokens: int = 16,
    raise_on_failure: bool = True,
    n_threads: int = 2,
    progress: Progress = NULL,
):
    """llama.cpp with the control vector vs transformers with the same vector added by hooks.

    Args:
        checkpoint: the HF model the GGUF was exported from (or ``default``).
        gguf_model: its f32 or f16 GGUF (the thresholds are per type).
        cv_path: the control vector GGUF.
        strength: run-time multiplier (llama.cpp's ``--control-vector-scaled F S``).
        languages, prompts, prompts_per_language: which prompts (``parity.parity_prompts``).
        max_new_tokens: greedy continuation length per prompt.
        raise_on_failure: raise VerificationError when the report fails.
        n_threads: llama.cpp CPU threads.
        progress: one tick per prompt.

    Returns:
        A ``ParityReport`` (kind ``control_vector``, variant the GGUF's type): metrics
        ``max_abs_logit_diff``, ``top1_agreement`` (distinct contexts), ``generation_match``,
        ``first_token_agreement``, ``vector_logit_shift`` (how far the vector moved llama.cpp's
        logits: 0 means it was ignored, a problem); per language; one row per prompt.

    Raises:
        VerificationError: (when ``raise_on_failure``) the report failed.
        AdapterError: a bad file, a vector of another width, a model type without limits.
    """
    from lens_merge.adapters._cv_check import compare_with_hooks

    cv = read_control_vector(cv_path)
    return compare_with_hooks(
        checkpoint, gguf_model, cv.scaled(strength), subject=cv_path, languages=languages,
        prompts=prompts, prompts_per_language=prompts_per_language,
        max_new_tokens=max_new_tokens, raise_on_failure=raise_on_failure, n_threads=n_threads,
        progress=progress)


def control_vector_effect(
    gguf_model: str | Path,
    cv_path: str | Path,
    language: str | None = None,
    *,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    checkpoint: str | Path | None = None,
    prompt_language: str = "en",
    n_prompts: int | None = None,
    max_new_tokens: int = 32,
    out: str | Path | None = None,
    n_threads: int = 2,
    progress: Progress = NULL,
) -> dict[str, Any]:
    """Share of greedy replies in ``language`` on the default held-out prompts, with the
    control vector applied in llama.cpp at each scale (and without it, scale 0).

    Args:
        gguf_model: the base model's GGUF.
        cv_path: the control vector GGUF.
        language: the language to count (default: the file's ``lens_merge.language``).
        scales: run-time multipliers (llama.cpp's ``--control-vector-scaled``).
        checkpoint: tokenize with this HF tokenizer (default: the GGUF's own template).
        prompt_language: language of the prompts (held-out rows of the default data).
        n_prompts: at most this many prompts (default: every held-out row).
        max_new_tokens: greedy reply length.
        out: write the result there as JSON (atomically).

    Returns:
        dict: language, prompt_language, n_prompts, rows (scale, share_in_language,
        share_in_prompt_language, languages found, examples), seconds.

    Raises:
        AdapterError: no language given or recorded, one langid cannot identify, a bad file.
    """
    from lens_merge.files import write_json_atomic

    lang = _effect_language(read_control_vector(cv_path), cv_path, language)
    res = control_vector_effects(gguf_model, {lang: cv_path}, scales=scales,
                                 checkpoint=checkpoint, prompt_language=prompt_language,
                                 n_prompts=n_prompts, max_new_tokens=max_new_tokens,
                                 n_threads=n_threads, progress=progress)[lang]
    if out is not None:
        write_json_atomic(out, res)
    return res


def control_vector_effects(
    gguf_model: str | Path,
    cv_paths: dict[str, str | Path],
    *,
    scales: tuple[float, ...] = DEFAULT_SCALES,
    checkpoint: str | Path | None = None,
    prompt_language: str = "en",
    n_prompts: int | None = None,
    max_new_tokens: int = 32,
    n_threads: int = 2,
    progress: Progress = NULL,
) -> dict[str, dict[str, Any]]:
    """``control_vector_effect`` of several vectors ``{language: file}`` on one base, with one
    model load and the replies without a vector generated once (they are the same for all).

    Returns:
        ``{language: control_vector_effect's dict}``.
    """
    from lens_merge.adapters._cv_check import language_shares

    vectors = {}
    for lang, path in cv_paths.items():
        cv = read_control_vector(path)
        vectors[_effect_language(cv, path, lang)] = cv.directions
    res = language_shares(gguf_model, vectors, scales=scales, checkpoint=checkpoint,
                          prompt_language=prompt_language, n_prompts=n_prompts,
                          max_new_tokens=max_new_tokens, n_threads=n_threads,
                          progress=progress)
    return {lang: {**r, "control_vector": str(cv_paths[lang])} for lang, r in res.items()}


def _effect_language(cv: ControlVector, cv_path: str | Path, language: str | None) -> str:
    """The language whose share a vector's effect counts (given, or the file's own)."""
    lang = language or cv.meta.get("lens_merge.language")
    if not lang:
        raise AdapterError(f"{cv_path}: records no language; pass language=")
    from lens_merge.config import DEFAULT_LANGUAGES  # the languages lens.langid can tell apart

    if lang not in DEFAULT_LANGUAGES:
        raise AdapterError(f"the reply-language effect can be measured for "
                           f"{', '.join(DEFAULT_LANGUAGES)} (lens.langid), not {lang!r}")
    return str(lang)
