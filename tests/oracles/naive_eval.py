"""Eval the way it was first written: the whole model twice over, ``generate`` with every state.

The base model is loaded in full, measured, the delta applied in place, and measured again;
states and logits come from ``generate(output_hidden_states=True, output_logits=True)`` at a
fixed batch size in prompt order. Kept as the ground truth for the shared-prefix eval
(``lens_merge.lens._generate``): the same report within float noise, the same greedy replies.
Not used for evaluation.
"""

from __future__ import annotations

from pathlib import Path

from lens_merge.data import PromptSet
from lens_merge.lens._generate import Measured
from lens_merge.lens.evaluate import EvalResult, build_report
from lens_merge.lens.hidden import batches, encode
from lens_merge.lens.probe import Subspace
from lens_merge.weights.delta import LensDelta, apply_delta


def naive_measure(model, tok, prompts: PromptSet, max_length: int, batch_size: int,
                  max_new_tokens: int, chat_template: bool) -> Measured:
    """Final last-token states, English next-token logits and greedy replies of ``model``."""
    import torch

    langs = list(prompts.languages)
    items = [(lang, text) for lang in langs for text in prompts.texts(lang)]
    zs: dict[str, list] = {lang: [] for lang in langs}
    rs: dict[str, list[str]] = {lang: [] for lang in langs}
    ls = []
    with torch.inference_mode():
        for chunk in batches(items, batch_size):
            enc = encode(tok, [text for _, text in chunk], max_length, chat_template)
            enc = {k: v.to(model.device) for k, v in enc.items()}
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
            else:
                out = model(**enc, output_hidden_states=True, use_cache=False,
                            logits_to_keep=1)
                z, first = out.hidden_states[-1][:, -1], out.logits[:, -1]
                replies = []
            z, first = z.float().cpu().clone(), first.float().cpu().clone()
            for i, (lang, _) in enumerate(chunk):
                zs[lang].append(z[i])
                if replies:
                    rs[lang].append(replies[i])
                if lang == langs[0]:
                    ls.append(first[i])
    return Measured({lang: torch.stack(zs[lang]) for lang in langs}, torch.stack(ls), rs)


def naive_evaluate(model_dir: str | Path, delta: LensDelta, subspace: Subspace,
                   prompts: PromptSet, max_length: int = 128, batch_size: int = 48,
                   max_new_tokens: int = 32, chat_template: bool = True) -> EvalResult:
    """The report of ``lens_merge.lens.evaluate.evaluate``, measured the first way."""
    from lens_merge.models import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="fp32")
    base = naive_measure(model, tok, prompts, max_length, batch_size, max_new_tokens,
                         chat_template)
    apply_delta(model, delta)
    lens = naive_measure(model, tok, prompts, max_length, batch_size, max_new_tokens,
                         chat_template)
    return build_report(prompts, delta, subspace, max_new_tokens, base, lens)
