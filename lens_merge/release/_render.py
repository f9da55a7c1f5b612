"""Markdown body of the model card, from what ``card.gather`` collected."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from lens_merge.release._results import fmt, results

_FALLBACK_PROMPT = "Explain in two sentences why the sky is blue."


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _intro(info: dict) -> list[str]:
    d, base = info["delta"], info["base"]
    langs = info["languages"]
    blocks = d.get("blocks") or []
    n = info.get("num_layers")
    base_link = (f"[{base['base_model']}](https://huggingface.co/{base['base_model']})"
                 if "/" in base["base_model"] else f"`{base['base_model']}`")
    lines = [f"# {info['name']}", "",
             f"**{info['name']}** is {base_link} with **Lens** applied for "
             f"{_plural(max(len(langs) - 1, 0), 'language')} besides English "
             f"({', '.join(f'`{x}`' for x in langs[1:])}). Lens edits only the top "
             f"{len(blocks)} of {n or '?'} decoder blocks so that prompts in other languages "
             "move toward the English representation of the same prompt in a "
             "language-agnostic subspace and away from English along each language's own "
             "direction, while English representations are kept. The Lens delta is folded "
             "into the weights: this is a plain `transformers` checkpoint, no adapter and no "
             "custom code.", ""]
    if info["pictures"].get("report/states_2d.png"):
        lines += ["![Mean top-layer state of each language before (hollow) and after (filled) "
                  "Lens, projected to 2-D with PCA](report/states_2d.png)", ""]
    return lines


def _changes(info: dict) -> list[str]:
    d = info["delta"]
    lw = d.get("loss_weights") or {}
    hp = d.get("hyperparameters") or {}
    data = d.get("data") or {}
    n = info.get("num_layers")
    langs = info["languages"]
    lines = ["## What Lens changed", "",
             f"- **Languages**: {', '.join(f'`{x}`' for x in langs)} "
             f"(`{langs[0] if langs else 'en'}` is the central language)",
             f"- **Blocks**: {', '.join(str(b) for b in d.get('blocks') or [])} of "
             f"{n or '?'} (top K = {d.get('top_k', len(d.get('blocks') or []))}); "
             f"{_plural(len(d.get('tensors') or {}), 'tensor')} changed, every other tensor is "
             "byte-identical to the base"]
    if lw:
        lines.append("- **Loss weights**: " + ", ".join(f"{k} {v}" for k, v in lw.items()))
    keys = ("lr", "epochs", "batch_size", "grad_accum", "optimizer_steps", "weight_decay",
            "warmup_ratio", "max_length", "dtype", "seed")
    shown = [f"{k} {hp[k]}" for k in keys if k in hp]
    if shown:
        lines.append("- **Training**: " + ", ".join(shown))
    if (prot := d.get("english_protection")) and hp.get("protect_english"):
        ranks = prot.get("protected_rank") or []
        lines.append(f"- **English protection**: every weight change is kept off the input "
                     f"directions holding {hp['protect_english'] * 100:g}% of the English inputs' "
                     f"energy (null-space projection; {len(ranks)} input spaces, protected "
                     f"ranks {min(ranks, default=0)}-{max(ranks, default=0)} of "
                     f"{max(prot.get('input_dim') or [0])})")
    if data:
        lines.append(f"- **Data**: {data.get('rows', '?')} parallel prompts per language from "
                     f"`{data.get('source', '?')}` (prompts only, no responses)")
    fl = d.get("final_losses") or {}
    if fl:
        lines.append("- **Final losses**: " + ", ".join(f"{k} {fmt(v)}" for k, v in fl.items()))
    return lines + [""]


def _parity(info: dict) -> list[str]:
    from lens_merge.release.verification import key_numbers

    v = info["verify"]
    lines = ["## Parity checks", "",
             "Each artifact is checked against the reference it was made from.", "",
             "| Check | Status | Numbers |", "|---|---|---|"]

    def numbers(report) -> str:
        return ", ".join(f"{k} {fmt(x)}" for k, x in key_numbers(report)) or "-"

    labels = {"fold": "Folded checkpoint vs base + delta at runtime",
              "gguf": "GGUF `{variant}` (llama.cpp) vs checkpoint",
              "onnx": "ONNX Runtime `{variant}` vs checkpoint",
              "adapters": "Adapter `{variant}` vs the folded model"}
    for kind, label in labels.items():
        ps = v.get(kind)
        if ps is None or not ps.reports:
            shown = (kind == "fold" or (kind == "gguf" and info["ggufs"])
                     or (kind == "onnx" and info["onnx_file"]))
            if shown:
                lines.append(f"| {label.format(variant='').replace(' ``', '')} | not run | - |")
            continue
        for r in ps.reports:
            shown = (Path(r.subject).name if kind in ("gguf", "adapters")
                     else r.variant or kind)
            name = label.format(variant=_cell(shown))
            lines.append(f"| {name} | {'passed' if r.passed else 'failed'} | {numbers(r)} |")
    return lines + [""]


def _usage(info: dict) -> list[str]:
    repo = info["repo_id"]
    rep = info["report"] or {}
    langs = info["languages"]
    prompt = _FALLBACK_PROMPT
    samples = rep.get("samples") or {}
    for lang in langs[1:]:
        if isinstance(samples.get(lang), dict) and samples[lang].get("prompt"):
            prompt = samples[lang]["prompt"]
            break
    lines = ["## Usage", "", "### transformers", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f"repo = {json.dumps(repo)}",
             "tok = AutoTokenizer.from_pretrained(repo)",
             "model = AutoModelForCausalLM.from_pretrained(repo)"]
    encode = _encode_lines(prompt, info["chat_template"])
    lines += encode
    lines += ["out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
              "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], "
              "skip_special_tokens=True))", "```", ""]
    if info["ggufs"]:
        pick = next((n for n, _ in info["ggufs"] if "Q8_0" in n), info["ggufs"][0][0])
        lines += ["### llama.cpp", "",
                  "GGUF files: " + ", ".join(f"`{n}` ({_size(s)})" for n, s in info["ggufs"]),
                  "", "```sh", f"hf download {repo} {pick} --local-dir .",
                  f"llama-cli -m {pick} -p {shlex.quote(prompt)} -n 64", "```", ""]
    lines += _adapter_usage(info, repo, prompt)
    if info["onnx_file"]:
        lines += ["### ONNX Runtime", "", "```python",
                  "from optimum.onnxruntime import ORTModelForCausalLM",
                  "from transformers import AutoTokenizer", "",
                  f"repo = {json.dumps(repo)}",
                  "tok = AutoTokenizer.from_pretrained(repo)",
                  "model = ORTModelForCausalLM.from_pretrained(repo, subfolder=\"onnx\", "
                  f"file_name={json.dumps(info['onnx_file'])})",
                  *encode,
                  "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
                  "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], "
                  "skip_special_tokens=True))", "```", ""]
    return lines


def _encode_lines(prompt: str, chat_template: bool) -> list[str]:
    """Snippet lines that turn the prompt into ``inputs`` (with the chat template if any)."""
    text = json.dumps(prompt, ensure_ascii=False)
    if chat_template:
        return [f"messages = [{{\"role\": \"user\", \"content\": {text}}}]",
                "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, "
                "return_tensors=\"pt\", return_dict=True)"]
    return [f"inputs = tok({text}, return_tensors=\"pt\")"]


def _adapter_usage(info: dict, repo: str, prompt: str) -> list[str]:
    """Usage of the adapters: the edit applied to a base the user already has."""
    ad = info.get("adapters") or {}
    base = info["base"]["base_model"]
    lines: list[str] = []
    if ad.get("peft"):
        lines += ["### PEFT adapter (on the base model)", "", "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM", "",
                  f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
                  f"model = PeftModel.from_pretrained(base, {json.dumps(repo)}, "
                  "subfolder=\"adapters/peft\")", "```", ""]
    if ad.get("gguf_lora"):
        f = ad["gguf_lora"]
        lines += ["### llama.cpp LoRA adapter (on a base GGUF you already have)", "", "```sh",
                  f"hf download {repo} adapters/{f} --local-dir .",
                  f"llama-cli -m BASE.gguf --lora adapters/{f} -p {shlex.quote(prompt)} -n 64",
                  "```", ""]
    if ad.get("control_vectors"):
        f = ad["control_vectors"][0]
        # scale 0.1: the vector is added after every block of its range and compounds; on the
        # default model 0.1 turns 52-60% of English-prompt replies into the target language,
        # 0.2 already degrades the text and 1.0 breaks it
        lines += ["### llama.cpp control vectors (one per language)", "",
                  "Files: " + ", ".join(f"`adapters/{x}`" for x in ad["control_vectors"]), "",
                  "```sh", f"hf download {repo} adapters/{f} --local-dir .",
                  f"llama-cli -m BASE.gguf --control-vector-scaled adapters/{f} 0.1 "
                  f"-p {shlex.quote(prompt)} -n 64", "```", ""]
        lines += _cv_effect(info.get("cv_effect"))
    return lines


def _cv_effect(effect: dict | None) -> list[str]:
    """The control vectors' measured effect: share of replies to English prompts that come
    out in the vector's language, per run-time scale (0 = the base model)."""
    langs = (effect or {}).get("languages") or {}
    if not langs:
        return []
    scales = sorted({float(r["scale"]) for e in langs.values() for r in e.get("rows", [])})
    n = next(iter(langs.values())).get("n_prompts", "?")
    lines = [f"Replies in the vector's language to {n} held-out English prompts (greedy, "
             "32 tokens, llama.cpp on the f16 base), by `--control-vector-scaled` scale:", "",
             "| language | " + " | ".join(f"{s:g}" for s in scales) + " |",
             "| --- |" + " --- |" * len(scales)]
    for lang, e in langs.items():
        share = {float(r["scale"]): r["share_in_language"] for r in e.get("rows", [])}
        lines.append(f"| {lang} | " + " | ".join(
            f"{share[s]:.0%}" if s in share else "-" for s in scales) + " |")
    return lines + [""]


def _provenance(info: dict) -> list[str]:
    import yaml

    from lens_merge import __version__

    d, base = info["delta"], info["base"]
    tool = d.get("tool") or {}
    lines = ["## Provenance", "",
             f"- Made with lens-merge {__version__} (delta written by lens-merge "
             f"{tool.get('version', '?')}, torch {tool.get('torch', '?')}, transformers "
             f"{tool.get('transformers', '?')})",
             f"- Base model: `{base['base_model']}` (reference `{base['ref']}`), license "
             f"`{base['license']}`"]
    cfg_hash = (d.get("base") or {}).get("config_sha256")
    if cfg_hash:
        lines.append(f"- Base config sha256: `{cfg_hash}`")
    if d.get("subspace_sha256"):
        lines.append(f"- Language subspace sha256: `{d['subspace_sha256']}`")
    lines += ["- `delta/` holds the delta itself (dW of the changed tensors, fp32, and "
              "`lens_delta.json`); base = this model - delta.",
              "- `report/` holds the evaluation, the training log, the probe output and the "
              "verification records.", ""]
    tensors = d.get("tensors") or {}
    if tensors:
        lines += ["<details><summary>sha256 of the base tensors the delta changes</summary>",
                  "", "| Tensor | Base sha256 |", "|---|---|"]
        lines += [f"| `{n}` | `{r.get('base_sha256', '?')}` |" for n, r in tensors.items()]
        lines += ["", "</details>", ""]
    if info["recipe"]:
        lines += ["Recipe:", "", "```yaml",
                  yaml.safe_dump(info["recipe"], sort_keys=False, allow_unicode=True).rstrip(),
                  "```", ""]
    return lines


def body(info: dict[str, Any]) -> str:
    """The card's markdown body (everything below the front matter)."""
    parts = (_intro(info) + _changes(info) + results(info) + _parity(info) + _usage(info)
             + _provenance(info))
    return "\n".join(parts).rstrip() + "\n"
