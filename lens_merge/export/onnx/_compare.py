"""One prompt through transformers, the ONNX graph and (when present) its int8 copy.

``reference`` runs a prompt through transformers and keeps what the graphs are compared with;
``check_prompt`` (fp graph) and ``check_int8`` compare full-sequence logits and greedy
KV-cache generations with it and add the numbers to a ``Tally``; ``verify.py`` runs one
model at a time and turns the tally into parity reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_merge.parity.metrics import (
    DistinctContexts,
    first_mismatch,
    kl_per_position,
    max_abs_diff,
    top1_same,
)

# Max |logit difference| against transformers (fp32, eager) for one prompt:
# max(atol, rtol * max|reference logit|). Rounding noise grows with the logit scale: on
# SmolLM2-135M (|logit| up to 39) transformers' own eager and sdpa kernels differ by 9.4e-5
# and ORT fp32 by 1.3e-4, so a flat 1e-4 would sit on the noise floor (fp32 bound there:
# 3.9e-4). fp16 keeps 11 significant bits (one ulp is 0.031 at |logit| 32-64): measured 0.087.
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-5}, "fp16": {"atol": 5e-2, "rtol": 8e-3}}


# ONNX Runtime session config entries that cut memory, on top of no CPU arena and no memory
# pattern (logits bit-identical, measured). Not "session.disable_prepacking": it saves 0.1 GB
# on SmolLM2-135M's fp32 session (1.07 GB over the process) but moves logits by up to 9e-5.
LEAN_SESSION: dict[str, str] = {}


def tolerance_for(dtype: str, tolerance: float | None, scale: float) -> float:
    """Allowed max |logit diff| for a prompt whose reference logits reach ``scale``."""
    if tolerance is not None:
        return float(tolerance)
    t = TOLERANCES[dtype]
    return max(t["atol"], t["rtol"] * scale)


def encode(tok: Any, text: str) -> dict[str, Any]:
    """One prompt, chat template applied, batch of 1."""
    from lens_merge.lens.hidden import encode as encode_batch

    enc = encode_batch(tok, [text], max_length=4096, chat_template=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def greedy(model: Any, enc: dict[str, Any], max_new: int, eos: list[int], pad: int):
    """New token ids and the per-step logits [steps, vocab] of a greedy KV-cache run."""
    import torch

    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, temperature=None,
                             top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad,
                             return_dict_in_generate=True, output_logits=True)
    n = enc["input_ids"].shape[1]
    steps = torch.stack([x[0].float() for x in out.logits])
    return out.sequences[0, n:].tolist(), steps


def load_ort(out: Path, file_name: str | None, lean: bool = True) -> Any:
    """``ORTModelForCausalLM`` on a graph of the folder (None: what ``from_pretrained`` picks).

    Args:
        out: the export folder.
        file_name: the graph file (None: ``from_pretrained``'s choice).
        lean: trade speed for memory (``LEAN_SESSION``); results are unchanged.
    """
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    # Idle ORT threads spin by default and starve the interleaved PyTorch reference runs;
    # spinning changes speed only, never results.
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if lean:
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        for key, value in LEAN_SESSION.items():
            so.add_session_config_entry(key, value)
    kwargs = {"file_name": file_name} if file_name else {}
    return ORTModelForCausalLM.from_pretrained(str(out), session_options=so, **kwargs)


def geometry_problem(model: Any) -> str | None:
    """Why ``model`` cannot generate through its KV cache (None: it can)."""
    shape = model.input_shapes.get("past_key_values.0.key")
    fed = (int(model.num_key_value_heads), int(model.embed_size_per_head))
    if not shape or not model.can_use_cache:
        return "the graph has no past_key_values inputs (no KV cache)"
    graph = tuple(d if isinstance(d, int) else None for d in (shape[1], shape[3]))
    if graph != fed:
        return (f"ORTModelForCausalLM feeds past_key_values as {fed[0]} heads x {fed[1]} but "
                f"the graph expects {graph[0]} x {graph[1]}")
    return None


def compare_generation(ref_tokens: list[int], ref_steps: Any, tokens: list[int], steps: Any,
                       tie_margin: float | None) -> dict[str, Any]:
    """Exactness of a greedy continuation; with ``tie_margin``, a divergence at a step whose
    reference top-2 margin is within it counts as a tie (fp16 only)."""
    first = first_mismatch(ref_tokens, tokens)
    n = min(len(ref_tokens), len(tokens))
    upto = n if first is None else min(first + 1, n)
    step_diff = max_abs_diff(ref_steps[:upto], steps[:upto])
    rec: dict[str, Any] = {"equal": first is None, "tokens": len(ref_tokens),
                           "first_mismatch": first, "kv_step_max_abs_logit_diff": step_diff,
                           "tie": False}
    if first is not None and first < len(ref_steps):
        top2 = ref_steps[first].topk(2).values
        rec["ref_top2_margin_at_mismatch"] = float(top2[0] - top2[1])
        rec["tie"] = tie_margin is not None and rec["ref_top2_margin_at_mismatch"] <= tie_margin
    return rec


@dataclass
class GraphTally:
    """Logit agreement of one graph with the reference, over every prompt."""

    contexts: DistinctContexts = field(default_factory=DistinctContexts)
    kl: list[float] = field(default_factory=list)
    first_token_same: int = 0
    per_lang: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_logits(self, ids: list[int], ref: Any, got: Any) -> list[float]:
        """Record one prompt's logits; returns its per-position KL."""
        self.contexts.add(ids, top1_same(ref, got))
        kl = kl_per_position(ref, got)
        self.kl += kl
        return kl


@dataclass
class Tally:
    """Running numbers of one verification: the fp graph, its generations, the int8 graph."""

    fp: GraphTally = field(default_factory=GraphTally)
    q: GraphTally = field(default_factory=GraphTally)
    gens: list[dict[str, Any]] = field(default_factory=list)
    worst: float = 0.0  # max over prompts of full-sequence diff / tolerance
    kv_worst: float = 0.0  # the same over greedy KV-cache steps
    tok_mismatch: int = 0
    q_equal: int = 0
    q_prefix: list[float] = field(default_factory=list)
    q_seconds: float = 0.0


@dataclass
class Reference:
    """One prompt's transformers side: the encoded prompt, its full-sequence logits and its
    greedy continuation with the per-step logits (kept so the model can be freed)."""

    lang: str
    enc: dict[str, Any]
    ids: list[int]
    logits: Any
    tokens: list[int]
    steps: Any


def check_prompt(t: Tally, r: Reference, fp: Any, dtype: str, tolerance: float | None,
                 max_new: int, eos: list[int], pad: int) -> float:
    """Compare one prompt's reference with the fp graph; returns its max |logit diff|."""
    import torch

    lang, enc, ids, ref = r.lang, r.enc, r.ids, r.logits
    with torch.inference_mode():
        got = fp(**enc).logits[0].float()
    tol = tolerance_for(dtype, tolerance, float(ref.abs().max()))
    diff = max_abs_diff(ref, got)
    t.fp.add_logits(ids, ref, got)
    ref_new, ref_steps = r.tokens, r.steps
    new, steps = greedy(fp, enc, max_new, eos, pad)
    step_tol = tolerance_for(dtype, tolerance, float(ref_steps.abs().max()))
    g = compare_generation(ref_new, ref_steps, new, steps,
                           2 * step_tol if dtype == "fp16" else None)
    g.update(language=lang, tolerance=step_tol)
    t.gens.append(g)
    t.fp.first_token_same += int(new[:1] == ref_new[:1])
    t.worst = max(t.worst, diff / tol)
    t.kv_worst = max(t.kv_worst, g["kv_step_max_abs_logit_diff"] / step_tol)
    d = t.fp.per_lang.setdefault(lang, {"max_abs_logit_diff": 0.0, "tolerance": tol,
                                        "prompts": 0, "generations_equal": 0})
    d["max_abs_logit_diff"] = max(d["max_abs_logit_diff"], diff)
    d["tolerance"] = min(d["tolerance"], tol)
    d["prompts"] += 1
    d["generations_equal"] += int(g["equal"])
    return diff


def check_int8(t: Tally, r: Reference, q: Any, max_new: int, eos: list[int],
               pad: int) -> None:
    """Compare one prompt's reference with the int8 graph."""
    import torch

    lang, enc, ids, ref, ref_new = r.lang, r.enc, r.ids, r.logits, r.tokens
    t0 = time.perf_counter()
    with torch.inference_mode():
        ql = q(**enc).logits[0].float()
    qnew, _ = greedy(q, enc, max_new, eos, pad)
    t.q_seconds += time.perf_counter() - t0
    kl = t.q.add_logits(ids, ref, ql)
    first = first_mismatch(ref_new, qnew)
    same = min(len(ref_new), len(qnew)) if first is None else first
    t.q_prefix.append(same / max(len(ref_new), 1))
    t.q_equal += int(qnew == ref_new)
    t.q.first_token_same += int(qnew[:1] == ref_new[:1])
    d = t.q.per_lang.setdefault(lang, {"kl_sum": 0.0, "positions": 0, "prompts": 0,
                                       "generations_equal": 0})
    d["kl_sum"] += sum(kl)
    d["positions"] += len(kl)
    d["prompts"] += 1
    d["generations_equal"] += int(qnew == ref_new)
