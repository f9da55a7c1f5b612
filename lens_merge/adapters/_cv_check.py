"""Control vector files read back, and the engines' side of the control vector checks, on
per-layer directions (``{N: vector}``, added to the output of block N, as llama.cpp does).

- ``read_control_vector``: a control vector GGUF read back the way llama.cpp's loader reads it.
- ``compare_with_hooks``: llama.cpp with the directions applied vs transformers with the same
  directions added by forward hooks on the decoder blocks.
- ``language_shares``: greedy replies in llama.cpp at several scales, and the share of them in
  each vector's language (``lens.langid.identify``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lens_merge.adapters import _llama
from lens_merge.errors import AdapterError, VerificationError
from lens_merge.progress import NULL, Progress
from lens_merge.records import ParityReport, parity_report

KIND = "control_vector"
ARCH = "controlvector"
KEY_HINT = "controlvector.model_hint"
KEY_COUNT = "controlvector.layer_count"


@dataclass
class ControlVector:
    """A control vector file read back: ``directions[N]`` is added to block N's output."""

    directions: dict[int, np.ndarray]
    model_hint: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_embd(self) -> int:
        return int(next(iter(self.directions.values())).size)

    def scaled(self, strength: float) -> dict[int, np.ndarray]:
        return {k: (v * np.float32(strength)).astype(np.float32)
                for k, v in self.directions.items()}


def read_control_vector(path: str | Path) -> ControlVector:
    """Read a control vector GGUF (ours or another tool's) the way llama.cpp's loader does.

    Raises:
        AdapterError: not a control vector, a tensor not named ``direction.N`` with N >= 1, a
            non-f32 or non-1-D tensor, or directions of different lengths.
    """
    from gguf import GGMLQuantizationType, GGUFReader

    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"{p}: no such control vector file")
    try:
        r = GGUFReader(str(p))
    except Exception as exc:  # noqa: BLE001 - the reader's own errors
        raise AdapterError(f"{p}: not a GGUF file ({type(exc).__name__}: {exc})") from None
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if fields.get("general.architecture") != ARCH:
        raise AdapterError(f"{p}: general.architecture is {fields.get('general.architecture')!r}"
                           f", expected {ARCH!r}")
    dirs: dict[int, np.ndarray] = {}
    for t in r.tensors:
        m = re.fullmatch(r"direction\.(\d+)", t.name)
        if not m or int(m.group(1)) == 0:
            raise AdapterError(f"{p}: tensor {t.name!r} is not direction.N with N >= 1")
        if t.tensor_type != GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise AdapterError(f"{p}: tensor {t.name} must be 1-D float32")
        k = int(m.group(1))
        v = np.asarray(t.data, dtype=np.float32).reshape(-1)
        dirs[k] = dirs[k] + v if k in dirs else v.copy()
    if not dirs:
        raise AdapterError(f"{p}: holds no direction tensors")
    if len({v.size for v in dirs.values()}) != 1:
        raise AdapterError(f"{p}: directions of different lengths")
    return ControlVector(dict(sorted(dirs.items())), fields.get(KEY_HINT),
                         {k: v for k, v in fields.items() if k.startswith("lens_merge.")})




@contextmanager
def hooked(model, directions: dict[int, np.ndarray], strength: float = 1.0) -> Iterator[None]:
    """Add ``strength * directions[k]`` to the output of decoder block k while inside."""
    import torch

    from lens_merge.architectures import for_config

    arch = for_config(model.config.to_dict())
    blocks = model.get_submodule(arch.block_prefix.split(".{bid}")[0])
    handles = []

    def make(v: torch.Tensor):
        def hook(_mod, _inp, out):
            if isinstance(out, tuple):
                return (out[0] + v.to(out[0].dtype),) + tuple(out[1:])
            return out + v.to(out.dtype)
        return hook

    try:
        for k, vec in directions.items():
            if not 0 <= k < len(blocks):
                raise AdapterError(f"direction.{k}: the model has blocks 0..{len(blocks) - 1}")
            v = torch.from_numpy(np.asarray(vec, dtype=np.float32) * np.float32(strength))
            handles.append(blocks[k].register_forward_hook(make(v)))
        yield
    finally:
        for h in handles:
            h.remove()


def compare_with_hooks(
    checkpoint: str | Path,
    gguf_model: str | Path,
    directions: dict[int, np.ndarray],
    *,
    subject: str | Path,
    languages: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    prompts_per_language: int = 1,
    max_new_tokens: int = 16,
    raise_on_failure: bool = True,
    n_threads: int = 2,
    progress: Progress = NULL,
) -> ParityReport:
    """llama.cpp (GGUF + directions) vs transformers (checkpoint + hooks); see
    ``control_vector.verify_control_vector``."""
    import torch

    from lens_merge.export.gguf._engines import generation_eos, hf_greedy, llama_greedy
    from lens_merge.lens.hidden import format_prompt
    from lens_merge.models import load_model, load_tokenizer, resolve_model
    from lens_merge.parity.prompts import parity_prompts
    from lens_merge.parity.thresholds import checks_for
    from lens_merge.provenance import now_iso

    t0 = time.perf_counter()
    checkpoint = resolve_model(checkpoint)
    tok = load_tokenizer(checkpoint)
    templated = bool(getattr(tok, "chat_template", None))
    items = parity_prompts(languages, per_language=prompts_per_language, prompts=prompts,
                           checkpoint=checkpoint, by_row=True)
    enc = [(lang, text, tok(format_prompt(tok, text), add_special_tokens=not templated)
            ["input_ids"]) for lang, text in items]
    n_ctx = max(len(e[2]) for e in enc) + max_new_tokens + 16
    llm = _llama.open_llama(gguf_model, n_ctx, n_threads)
    rows, shift = [], 0.0
    try:
        variant = _llama.file_type_label(llm)
        limits = _llama.adapter_limits(KIND, variant, gguf_model)
        n_layer = _llama.n_layer_of(llm)
        eos = _llama.eos_ids(llm) | set(generation_eos(checkpoint))
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        plain = {i: _llama.scores(llm, e[2]) for i, e in enumerate(enc)}
        _llama.set_control_vector(llm, directions, n_layer)
        model = load_model(checkpoint, dtype="fp32")
        with progress.task(f"verify {Path(subject).name}", total=len(enc)) as task, \
                hooked(model, directions):
            for i, (lang, text, ids) in enumerate(enc):
                got = _llama.scores(llm, ids)
                shift = max(shift, float(np.abs(got - plain[i]).max()))
                with torch.inference_mode():
                    ref = model(torch.tensor([ids])).logits[0].float().numpy()
                ref_gen = hf_greedy(model, ids, max_new_tokens, eos)
                got_gen = llama_greedy(llm, ids, max_new_tokens, eos)
                row, same = _llama.compare_row(
                    lang, text, ids, ref, got, ref_gen, got_gen,
                    (tok.decode(ref_gen, skip_special_tokens=False),
                     tok.decode(got_gen, skip_special_tokens=False)))
                rows.append((ids, row, same))
                task.advance(1, lang=lang, diff=row["max_abs_logit_diff"])
    finally:
        llm.close()
    total, per_lang = _llama.tally_rows(rows)
    metrics = {**total.metrics(), "vector_logit_shift": shift}
    report = parity_report(
        KIND, subject, f"{checkpoint} + forward hooks", checks=checks_for(limits, metrics),
        problems=[] if shift > 0 else ["the control vector did not move llama.cpp's logits"],
        variant=variant, metrics=metrics, languages=sorted(per_lang), n_prompts=len(rows),
        per_language={k: v.metrics() for k, v in per_lang.items()}, verified_at=now_iso(),
        seconds=round(time.perf_counter() - t0, 3),
        details={"prompts": [r for _, r, _ in rows], "gguf_model": str(gguf_model),
                 "layers": sorted(directions), "max_new_tokens": max_new_tokens})
    if not report.passed and raise_on_failure:
        raise VerificationError(f"{Path(subject).name}: control vector verification failed: "
                                f"{'; '.join(report.failures)}", report)
    return report


def language_shares(
    gguf_model: str | Path,
    vectors: dict[str, dict[int, np.ndarray]],
    *,
    scales: Sequence[float],
    checkpoint: str | Path | None = None,
    prompt_language: str = "en",
    n_prompts: int | None = None,
    max_new_tokens: int = 32,
    n_threads: int = 2,
    progress: Progress = NULL,
) -> dict[str, dict[str, Any]]:
    """Greedy llama.cpp replies to held-out prompts at each scale (0 = no vector first) and the
    share identified as each vector's language, for several vectors ``{language: directions}``
    with one model load: the replies without a vector are generated once and count for every
    language; see ``control_vector.control_vector_effects``.

    Returns:
        ``{language: {"rows": [...], ...}}`` (``control_vector.control_vector_effect``'s dict).
    """
    from lens_merge.data import load_prompts
    from lens_merge.export.gguf._engines import llama_greedy
    from lens_merge.lens.langid import identify

    t0 = time.perf_counter()
    texts = load_prompts("default", [prompt_language], split="heldout",
                         max_samples=n_prompts).texts(prompt_language)
    if checkpoint is not None:
        from lens_merge.lens.hidden import format_prompt
        from lens_merge.models import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(checkpoint))
        templated = bool(getattr(tok, "chat_template", None))
        ids = [tok(format_prompt(tok, t), add_special_tokens=not templated)["input_ids"]
               for t in texts]
    else:
        small = _llama.open_llama(gguf_model, 64, n_threads)
        try:
            ids = [_llama.gguf_prompt_ids(small, t) for t in texts]
        finally:
            small.close()
    llm = _llama.open_llama(gguf_model, max(len(i) for i in ids) + max_new_tokens + 16,
                            n_threads)
    steered = [float(s) for s in scales if float(s) != 0.0]
    found: dict[tuple[str | None, float], tuple[list[str], list[str]]] = {}
    try:
        eos, n_layer = _llama.eos_ids(llm), _llama.n_layer_of(llm)
        runs = [(None, 0.0)] + [(lang, s) for lang in vectors for s in steered]
        with progress.task("control vector effect", total=len(runs) * len(ids)) as task:
            for lang, s in runs:
                _llama.set_control_vector(
                    llm, {k: (v * np.float32(s)).astype(np.float32)
                          for k, v in vectors[lang].items()} if lang else None, n_layer)
                replies = []
                for p in ids:
                    gen = [t for t in llama_greedy(llm, p, max_new_tokens, eos) if t not in eos]
                    replies.append(llm.detokenize(gen).decode("utf-8", errors="ignore"))
                    task.advance(1, scale=s)
                found[lang, s] = (replies, [identify(r) for r in replies])
    finally:
        llm.close()
    seconds = round(time.perf_counter() - t0, 3)
    out = {}
    for lang, directions in vectors.items():
        rows = []
        for key in [(None, 0.0)] + [(lang, s) for s in steered]:
            replies, langs = found[key]
            rows.append({"scale": key[1],
                         "share_in_language": langs.count(lang) / len(langs),
                         "share_in_prompt_language": langs.count(prompt_language) / len(langs),
                         "languages": {str(k): langs.count(k) for k in sorted(
                             set(langs), key=str)},
                         "examples": replies[:3]})
        out[lang] = {"kind": "control_vector_effect", "language": lang,
                     "prompt_language": prompt_language, "n_prompts": len(ids),
                     "max_new_tokens": max_new_tokens, "gguf_model": str(gguf_model),
                     "layers": sorted(directions), "rows": rows, "seconds": seconds}
    return out
