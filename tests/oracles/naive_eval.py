"""Eval the way it was first written: the whole model twice over, ``generate`` with every state.

The base model is loaded in full, measured, the delta applied in place, and measured again;
states and logits come from ``generate(output_hidden_states=True, output_logits=True)`` at a
fixed batch size in prompt order. The steered branch is the whole base model with a forward
pre-hook on block N-K adding each row's vector to its input. The first-token mass is the
softmax of the first step's logits summed over the language's ids, written out here. Kept as
the ground truth for the shared-prefix eval (``lens_merge.lens._generate``): the same report
within float noise, the same greedy replies. Not used for evaluation.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from lens_merge.data import PromptSet
from lens_merge.lens._generate import Measured
from lens_merge.lens.evaluate import EvalResult, build_report
from lens_merge.lens.hidden import batches, encode
from lens_merge.lens.probe import Subspace
from lens_merge.weights.delta import LensDelta, apply_delta


@contextmanager
def _pre_hook(block, shift):
    def hook(module, args, kwargs):
        if args:
            return (args[0] + shift.to(args[0].dtype), *args[1:]), kwargs
        kwargs["hidden_states"] = kwargs["hidden_states"] + shift.to(kwargs["hidden_states"].dtype)
        return args, kwargs

    h = block.register_forward_pre_hook(hook, with_kwargs=True) if shift is not None else None
    try:
        yield
    finally:
        if h is not None:
            h.remove()


def _cut(row: list[int], stops: set[int]) -> tuple[int, ...]:
    out = []
    for t in row:
        if t in stops:
            break
        out.append(t)
    return tuple(out)


def naive_measure(model, tok, prompts: PromptSet, max_length: int, batch_size: int,
                  max_new_tokens: int, chat_template: bool,
                  token_ids: dict[str, list[int]] | None = None,
                  steer: dict | None = None, layer: int | None = None) -> Measured:
    """States, English logits, first-token mass, greedy replies (text and ids) of ``model``;
    with ``steer`` (language -> [d]) added to the input of block ``layer`` of that language's
    rows."""
    import torch

    langs = list(prompts.languages)
    items = [(lang, text) for lang in langs for text in prompts.texts(lang)]
    zs: dict[str, list] = {lang: [] for lang in langs}
    rs: dict[str, list[str]] = {lang: [] for lang in langs}
    ids: dict[str, list] = {lang: [] for lang in langs}
    ms: dict[str, list[float]] = {lang: [] for lang in langs}
    ls = []
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos]) | {tok.pad_token_id}
    block = model.model.layers[layer] if steer is not None else None
    with torch.inference_mode():
        for chunk in batches(items, batch_size):
            enc = encode(tok, [text for _, text in chunk], max_length, chat_template)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            shift = None
            if steer is not None:
                d = model.config.hidden_size
                shift = torch.stack([steer.get(lang, torch.zeros(d)).float()
                                     for lang, _ in chunk])[:, None]
            with _pre_hook(block, shift):
                if max_new_tokens > 0:
                    gen = model.generate(input_ids=enc["input_ids"],
                                         attention_mask=enc["attention_mask"],
                                         max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=tok.pad_token_id,
                                         output_hidden_states=True, output_logits=True,
                                         return_dict_in_generate=True)
                    z, first = gen.hidden_states[0][-1][:, -1], gen.logits[0]
                    new = gen.sequences[:, enc["input_ids"].shape[1]:]
                    replies = tok.batch_decode(new, skip_special_tokens=True)
                    cut = [_cut(r, stops) for r in new.tolist()]
                else:
                    out = model(**enc, output_hidden_states=True, use_cache=False,
                                logits_to_keep=1)
                    z, first = out.hidden_states[-1][:, -1], out.logits[:, -1]
                    replies, cut = [], []
            z, first = z.float().cpu().clone(), first.float().cpu().clone()
            probs = torch.softmax(first.double(), -1)
            for i, (lang, _) in enumerate(chunk):
                zs[lang].append(z[i])
                if replies:
                    rs[lang].append(replies[i])
                    ids[lang].append(cut[i])
                if lang == langs[0]:
                    ls.append(first[i])
                if token_ids and lang in token_ids:
                    ms[lang].append(float(probs[i, sorted(set(token_ids[lang]))].sum()))
    return Measured({lang: torch.stack(zs[lang]) for lang in langs}, torch.stack(ls), rs,
                    {lang: torch.tensor(ms[lang], dtype=torch.float64)
                     for lang in langs if token_ids and lang in token_ids}, ids)


def naive_evaluate(model_dir: str | Path, delta: LensDelta, subspace: Subspace,
                   prompts: PromptSet, max_length: int = 128, batch_size: int = 48,
                   max_new_tokens: int = 32, chat_template: bool = True,
                   token_ids: dict[str, list[int]] | None = None,
                   alphas: dict[str, float] | None = None,
                   steering: dict | None = None) -> EvalResult:
    """The report of ``lens_merge.lens.evaluate.evaluate``, measured the first way.

    ``alphas`` (language -> alpha, as the eval chose them): the steered branch, delta_l read
    from the probe layer whose states enter the lowest block the delta changes
    (``Subspace.layers[k]`` holds ``hidden_states[k + 1]``); ``steering`` is copied into the
    report's ``summary.steering``.
    """
    import re

    from lens_merge.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="fp32")
    args = (tok, prompts, max_length, batch_size, max_new_tokens, chat_template, token_ids)
    got = {"base": naive_measure(model, *args)}
    if alphas is not None:
        first = min(int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in delta.tensors)
        vecs = {lang: a * subspace.layers[first - 1].deltas[subspace.languages.index(lang)]
                for lang, a in alphas.items() if a > 0}
        got["steer"] = naive_measure(model, *args, steer=vecs, layer=first)
    apply_delta(model, delta)
    got["lens"] = naive_measure(model, *args)
    return build_report(prompts, delta, subspace, max_new_tokens, got, steering)
