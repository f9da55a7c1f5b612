"""The memory formulas of every stage, from a ``ModelShape`` and a ``Workload`` alone.

Notation: d hidden, f intermediate, N blocks, H query heads, Hkv key/value heads, hd head
dimension, V vocabulary, P all parameters, Pb one block's parameters (``shapes``), s the stored
bytes per weight, st the training dtype's bytes, K = ``train.top_k``, n = K*Pb the trained
parameters, L languages, T = ``data.max_length``, G = ``eval.max_new_tokens``; sf = se = st
(the frozen pass and eval compute in the training dtype).

Exact terms: weights and optimizer states (parameter counts are exact), the training cache
and the activations kept between blocks, all taken with every prompt padded to T, which
makes them upper bounds (real prompts are shorter). Estimates, marked ``~`` in the term
names: the per-token working memory inside a block (which intermediate tensors transformers
keeps alive at once), the process baselines, the GGUF/ONNX exporters' copies and the size
of quantized GGUF files.

Stages (what the code holds at its peak; see each function):

- ``probe``/``cache``: the frozen pass streamed one block at a time in sf (``lens.stream``):
  the larger of the embeddings and one block, the states [rows*L, T, d] and attention masks
  [rows*L, T, T] of every prompt in sf, one batch's working memory inside a block, the
  probe's pooled states of every layer [N, rows*L, d] fp32; when it builds the cache, the
  fp32 copy of the stream entering block N-K, the reference states [rows, L+1, d] and the
  base's English next-token log-probabilities [rows, V] fp32 (the head, [V, d] in sf, is read
  after the blocks are freed, so it stays under the pass's peak).
- ``train``: the top K blocks only, fp32 master weights: per trained parameter 4 (weights)
  + 4 (grads) + 8 (AdamW m, v) + 2 under bf16 autocast (its bf16 weight copies); the
  activations of a step (batch_size*L rows of T tokens) kept for backward in every trained
  block plus one block's worth of gradients; the frozen head [V, d] in st and the English
  rows' next-token log-probabilities for the KL term (``train.lambda_kl`` > 0; counted unless
  the workload says it is off); with the reply KL (``train.lambda_kl_replies``) the frozen
  copy of the top K blocks, the reply rows' activations and their log-probabilities; with
  ``train.protect_english`` that copy, per block 3 [d, d] + 1 [f, f] fp32 input moments and
  projector bases, one f64 eigh of [f, f]; on the host the base copy and the delta of the
  trained tensors (fp32; plus the trained weights copied off a GPU) and the cache. The cache's
  reply KL first generates the base's English replies with the whole model in sf
  (``replies_need``; freed before the frozen pass: the stage's peak is the larger of the two).
- ``eval``: one model in se + the Lens copies of the top K blocks + the fp32 delta, and a
  generation batch (``lens_merge.lens._generate``): per row two KV caches (base and Lens)
  of N blocks for T+G positions, logits, the prefill's attention scores and MLP; the batch is
  at most ``eval.batch_size`` rows and within ``eval.max_memory`` (default: half the free
  GPU memory or a quarter of the available RAM). se is the training dtype's bytes, as for
  the frozen pass: ``run_eval`` must pass ``dtype=recipe.train.dtype`` to ``evaluate``
  (today it keeps ``evaluate``'s default fp32, which for a bf16 8B base is 32 GB).
- ``fold`` (CPU): the fp32 delta + one changed tensor as stored, in fp32, W + dW, cast back.
- ``verify`` (CPU): one model at a time in s (base + delta, then the folded one), the logits
  of every parity prompt of the first kept [prompts, 64, V] fp32, and one batch's logits
  [8, 64, V] (as returned, an fp32 copy, the masked copy).
- ``gguf`` (CPU, today's code): export holds one tensor (fp32, a converted copy, the encoded
  bytes); verification holds the checkpoint in fp32 in transformers and the GGUF mapped by
  llama.cpp, with its logits for every position.
- ``onnx`` (CPU, ~): export in a child (its peak counts): the dynamo exporter holds the
  model and streams the weights out (optimum's path also the protobuf, its string and bytes);
  verify holds one model at a time: PyTorch fp32 (with the kept logits and greedy steps of
  every prompt), then each ONNX Runtime session (graph read + weights).
- ``bench`` (recipe device, ~): lm-eval on one model in ``bench.dtype`` with the delta applied
  in place, and a batch's logits at up to ``BENCH_TOKENS`` tokens (fp32, with log-softmax).
- ``adapters`` (CPU): the largest of its checks, each one model at a time: the PEFT check
  (one fp32 model + the kept logits of every pass), the llama.cpp LoRA check (the base GGUF in
  the adapter's outtype mapped, its logits for every position) and the control vector check
  (transformers fp32 + the f16 base GGUF mapped in llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lens_merge.plan.constants import (  # noqa: F401  (re-exported: formulas' names)
    BENCH_TOKENS,
    CPU_BASE,
    CUDA_CONTEXT,
    CUDA_HOST_BASE,
    GGUF_BYTES,
    GGUF_VERIFY_EXTRA,
    VERIFY_BATCH,
    VERIFY_PER_LANGUAGE,
    VERIFY_TOKENS,
    GiB,
    MiB,
)
from lens_merge.plan.shapes import ModelShape


@dataclass(frozen=True)
class Workload:
    """The data sizes and settings of a recipe the formulas read (``plan.workload_of``)."""

    languages: int
    max_length: int
    top_k: int
    train_rows: int
    probe_rows: int
    shared_pass: bool
    eval_rows: int
    train_dtype: str = "fp32"
    train_batch: int = 1
    train_kl: bool = True  # the trainer holds the frozen head (train.lambda_kl > 0)
    train_kl_tokens: bool = False  # + a frozen copy of the top K blocks, per-token log-probs
    train_replies: int = 0  # R, the base's English reply tokens (train.lambda_kl_replies > 0)
    train_protect: bool = False  # train.protect_english: English input moments, projectors
    cache_batch: int = 16
    probe_batch: int = 16
    eval_batch: int = 48
    eval_budget: int | None = None
    max_new_tokens: int = 32
    gguf_outtypes: tuple[str, ...] = ()
    gguf_verify: bool = True
    onnx_dtype: str | None = None
    onnx_quantize: bool = False
    onnx_verify: bool = True
    onnx_exporter: str = "dynamo"  # export.onnx.exporter
    bench_dtype: str | None = None  # None: no bench stage
    bench_batch: int = 8
    lora_verify: bool = False  # the PEFT check of export.lora
    gguf_lora: str | None = None  # export.gguf_lora's outtype when it is verified
    cv_verify: bool = False  # the control vector check (transformers + the f16 base GGUF)
    estimated: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Need:
    """Peak memory of one stage: named terms on the device it runs on and on the host."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    disk: int = 0
    note: str = ""

    @property
    def device_peak(self) -> int:
        return sum(self.device.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())


def token_infer_bytes(m: ModelShape, T: int, s: int) -> int:
    """~ Working memory per token while one block runs without gradients: the larger of the
    attention phase (normed input, q/k/v, rotated q/k, k/v repeated to H heads, scores and
    probabilities over T keys, the attention output) and the MLP phase (gate, up, their
    product), plus the block's input and output. Eager attention, as the stages load it."""
    qkv = (m.n_heads + 2 * m.n_kv) * m.head_dim
    attn = m.d + qkv + (m.n_heads + m.n_kv) * m.head_dim + 3 * m.n_heads * m.head_dim \
        + 2 * m.n_heads * T
    mlp = m.d + 3 * m.f
    return (max(attn, mlp) + 2 * m.d) * s


def token_train_bytes(m: ModelShape, T: int, st: int) -> int:
    """~ Memory per token one block keeps for backward: in st, the normed inputs, q/k/v,
    rotated q/k, repeated k/v, scores and probabilities, the attention and o outputs, gate,
    up, activation and product; in fp32 the residual stream and the norms' fp32 inputs."""
    h, kv, hd = m.n_heads, m.n_kv, m.head_dim
    low = 3 * m.d + (h + 2 * kv) * hd + (h + kv) * hd + 3 * h * hd + 2 * h * T + 4 * m.f
    return low * st + 3 * m.d * 4


def cache_bytes(m: ModelShape, w: Workload) -> int:
    """Training cache on disk: the fp32 stream entering block N-K [rows*L, T, d], the
    reference states (last token per language [rows, L, d], English mean [rows, d]) and the
    base's English next-token log-probabilities [rows, V] fp32."""
    stream = w.train_rows * w.languages * w.max_length * m.d * 4
    replies = w.train_rows * ((w.max_length + w.train_replies) * m.d * 4 + 8) \
        if w.train_replies else 0
    return stream + replies + w.train_rows * ((w.languages + 1) * m.d + m.vocab) * 4


def replies_need(m: ModelShape, w: Workload, gpu: bool) -> Need:
    """The base's English replies (``train.lambda_kl_replies``): the whole model in sf,
    ``cache_batch`` prompts at a time (KV cache of T+R positions, a step's logits)."""
    sf, R = _bytes(w.train_dtype), w.train_replies
    need = Need(note=f"base English replies, batch {w.cache_batch}")
    need.device["~cuda context" if gpu else "~process"] = CUDA_CONTEXT if gpu else CPU_BASE
    need.device["the whole model (replies)"] = m.params * sf
    need.device["KV cache [batch, N, T+R] + step logits"] = w.cache_batch * (
        m.n_layers * m.n_kv * m.head_dim * 2 * sf * (w.max_length + R) + m.vocab * 4 * 2)
    if gpu:
        need.host["~process"] = CUDA_HOST_BASE
        need.host["one weight file read"] = \
            m.largest_shard or min(m.params * m.dtype_bytes, 5 * GiB)
    return need


def frozen_pass(m: ModelShape, w: Workload, rows: int, batch: int, pooled_rows: int,
                cache: bool, gpu: bool) -> Need:
    """The streamed frozen pass over ``rows`` prompts in every language (see module doc)."""
    sf, T = _bytes(w.train_dtype), w.max_length
    need = Need()
    need.device["~cuda context" if gpu else "~process"] = CUDA_CONTEXT if gpu else CPU_BASE
    need.device["weights: max(embeddings, one block)"] = max(m.embed_params, m.block_params) * sf
    need.device["states of every prompt [rows*L, T, d]"] = rows * w.languages * T * m.d * sf
    need.device["attention masks [rows*L, T, T]"] = rows * w.languages * T * T * sf
    need.device["~block working memory (one batch)"] = batch * T * token_infer_bytes(m, T, sf)
    if pooled_rows:
        need.device["pooled states fp32 [N, rows*L, d]"] = \
            m.n_layers * pooled_rows * w.languages * m.d * 4
    if cache:
        need.disk = cache_bytes(m, w)
        (need.host if gpu else need.device)["training cache (fp32, until saved)"] = need.disk
    if gpu:
        need.host["~process"] = CUDA_HOST_BASE
        need.host["one tensor read (embeddings)"] = m.embed_params * m.dtype_bytes
    if cache and w.train_replies:  # the replies come first, their model freed: the larger
        gen = replies_need(m, w, gpu)
        if gen.device_peak > need.device_peak:
            gen.disk = need.disk
            return gen
    return need


def _bytes(dtype: str) -> int:
    return 2 if dtype in ("bf16", "fp16") else 4


def train_need(m: ModelShape, w: Workload, gpu: bool) -> Need:
    """Training the top K blocks on the cache (see module doc)."""
    st = _bytes(w.train_dtype)
    n = w.top_k * m.block_params
    per_param = 16 + (2 if st < 4 else 0)
    rows, T = w.train_batch * w.languages, w.max_length
    need = Need(disk=cache_bytes(m, w))
    need.device["~cuda context" if gpu else "~process"] = CUDA_CONTEXT if gpu else CPU_BASE
    need.device[f"top K blocks x {per_param} B/param (fp32 weights, grads, AdamW"
                + (", bf16 copies)" if st < 4 else ")")] = n * per_param + m.d * 4
    need.device["~activations kept for backward"] = \
        rows * T * (w.top_k + 1) * token_train_bytes(m, T, st) + rows * T * m.d * 4
    if w.train_kl or w.train_kl_tokens or w.train_replies:  # English log-probs, the base's
        need.device["frozen head [V, d] (KL term)"] = m.vocab * m.d * st
        need.device["~English next-token log-probs (KL term)"] = w.train_batch * m.vocab * 4 * 5
    if w.train_kl_tokens or w.train_replies or w.train_protect:  # the base's top K, frozen
        need.device["frozen copy of the top K blocks, fp32 (per-token KL)"] = n * 4
    if w.train_protect:  # see the module doc
        need.device["English input moments + projectors"] = 16 * m.f ** 2 + w.top_k * 8 * (
            3 * m.d ** 2 + m.f ** 2)
    if w.train_kl_tokens:  # train.lambda_kl_tokens: every English token
        need.device["~English log-probs at every token (per-token KL)"] = \
            w.train_batch * T * m.vocab * 4 * 5
    if w.train_replies:  # train.lambda_kl_replies: prompt + reply rows, R positions' log-probs
        R = w.train_replies
        need.device["~activations of the English reply rows"] = w.train_batch * (T + R) * (
            w.top_k + 1) * token_train_bytes(m, T + R, st)
        need.device["~log-probs at the reply positions (reply KL)"] = w.train_batch * R * \
            m.vocab * 20
    side = need.host if gpu else need.device
    if gpu:
        side["~process"] = CUDA_HOST_BASE
        if w.train_kl or w.train_kl_tokens or w.train_replies:
            side["one tensor read (head)"] = m.vocab * m.d * (m.dtype_bytes + st)
    side["base copy + delta of the top K blocks, fp32" + (" + trained copy" if gpu else "")] \
        = n * (12 if gpu else 8)
    side["training cache"] = need.disk
    return need


def eval_row_bytes(m: ModelShape, w: Workload) -> int:
    """~ Generation memory of one prompt row, as ``lens_merge.lens._generate.row_bytes``
    counts it: two KV caches (base and Lens) of N blocks for T+G positions, the logits and
    their fp32 copies, the prefill's attention scores (3 x H x T fp32 per token) and MLP."""
    s, T = _bytes(w.train_dtype), w.max_length
    kv = m.n_layers * m.n_kv * m.head_dim * 2 * s * (T + w.max_new_tokens)
    logits = m.vocab * 4 * 4
    prefill = T * (3 * m.n_heads * T * 4 + (3 * m.f + 8 * m.d) * s)
    return 2 * kv + logits + prefill


def eval_workspace(m: ModelShape, w: Workload, b: int) -> int:
    """Generation memory of a batch of ``b`` prompts."""
    return b * eval_row_bytes(m, w)


def eval_batch(m: ModelShape, w: Workload) -> int:
    """The generation batch: ``eval.batch_size`` (at most the prompts), or the largest not
    above it whose workspace fits ``eval.max_memory``."""
    b = max(1, min(w.eval_batch, w.eval_rows * w.languages))
    if w.eval_budget is not None:
        while b > 1 and eval_workspace(m, w, b) > w.eval_budget:
            b -= 1
    return b


def eval_need(m: ModelShape, w: Workload, gpu: bool) -> Need:
    """Base vs Lens on held-out prompts (see module doc)."""
    b = eval_batch(m, w)
    need = Need(note=f"generation batch {b}")
    need.device["~cuda context" if gpu else "~process"] = CUDA_CONTEXT if gpu else CPU_BASE
    need.device["model + Lens copies of the top K blocks"] = \
        (m.params + w.top_k * m.block_params) * _bytes(w.train_dtype)
    need.device[f"~generation (batch {b}: KV caches, prefill, logits)"] = \
        eval_workspace(m, w, b)
    need.device["delta fp32"] = w.top_k * m.block_params * 4
    if gpu:
        need.host["~process"] = CUDA_HOST_BASE
        need.host["one weight file read"] = \
            m.largest_shard or min(m.params * m.dtype_bytes, 5 * GiB)
    return need


def fold_need(m: ModelShape, w: Workload) -> Need:
    """Streaming fold on the CPU (see module doc)."""
    need = Need()
    need.device["~process"] = CPU_BASE
    need.device["delta fp32"] = w.top_k * m.block_params * 4
    need.device["one changed tensor (stored, fp32, W + dW, cast)"] = \
        m.largest_block_tensor * (2 * m.dtype_bytes + 8)
    return need


def verify_need(m: ModelShape, w: Workload) -> Need:
    """``verify_fold`` on the CPU: one model at a time (see module doc)."""
    s, b, T = m.dtype_bytes, VERIFY_BATCH, VERIFY_TOKENS
    prompts = w.languages * VERIFY_PER_LANGUAGE
    need = Need(note="one model at a time, the first one's logits kept")
    need.device["~process"] = CPU_BASE
    need.device["one model (base + delta, then the folded one)"] = m.params * s
    need.device["delta fp32"] = w.top_k * m.block_params * 4
    need.device["kept logits of every prompt [prompts, 64, V] fp32"] = prompts * T * m.vocab * 4
    need.device["batch logits [8, 64, V] (returned, fp32, masked)"] = b * T * m.vocab * (s + 8)
    need.device["~block working memory"] = b * T * token_infer_bytes(m, T, s)
    return need


def gguf_need(m: ModelShape, w: Workload) -> Need:
    """GGUF export and verification on the CPU as the code does it today (module doc)."""
    need = Need()
    need.device["~process"] = CPU_BASE
    export = m.largest_tensor * (4 + 4 + 2)
    if not w.gguf_verify:
        need.device["~one tensor (fp32, converted, encoded)"] = export
        return need
    biggest = max(w.gguf_outtypes, key=lambda t: GGUF_BYTES.get(t.lower(), 4.0))
    gguf = int(m.params * GGUF_BYTES.get(biggest.lower(), 4.0))
    n_ctx = w.max_length + GGUF_VERIFY_EXTRA
    verify = m.params * 4 + gguf + 2 * n_ctx * m.vocab * 4
    need.note = f"verify: fp32 reference + {biggest} GGUF mapped"
    need.device["~max(export: one tensor; verify: fp32 model + GGUF + logits)"] = \
        max(export, verify)
    return need


def onnx_need(m: ModelShape, w: Workload) -> Need:
    """ONNX export (a child process: optimum traces the whole model) and verification, one
    model at a time (module doc)."""
    so = 2 if w.onnx_dtype == "fp16" else 4
    need = Need(note="export in a child process; verify one model at a time")
    need.device["~process"] = CPU_BASE
    # SmolLM2-135M fp32 (0.54 GB of weights): optimum's TorchScript path holds the model, the
    # protobuf, its string and bytes (child 3.0 GB = the process + ~5x the weights); dynamo
    # streams the weights (child 1.3 GB: ~2x); verification 1.7-1.95 GB
    export = (5 if w.onnx_exporter == "optimum" else 2) * m.params * so
    # transformers fp32, then an ONNX Runtime session: the graph read and its weights
    verify = max(m.params * 4, 2 * m.params * so) if w.onnx_verify else 0
    need.device["~max(export: ~2 (optimum ~5) copies; verify: PyTorch or one ONNX Runtime "
                "session)"] = max(export, verify)
    return need


def bench_need(m: ModelShape, w: Workload) -> Need:
    """lm-eval on base and base + delta, one model (module doc)."""
    s = _bytes(w.bench_dtype or "fp32")
    need = Need(note=f"lm-eval batch {w.bench_batch}")
    need.device["~process"] = CPU_BASE
    need.device["model in bench.dtype"] = m.params * s
    need.device["delta fp32"] = w.top_k * m.block_params * 4
    need.device["~batch logits [batch, 512, V] fp32 + log-softmax"] = \
        w.bench_batch * BENCH_TOKENS * m.vocab * 4 * 2
    return need


def adapters_need(m: ModelShape, w: Workload) -> Need:
    """The adapters stage's checks on the CPU; its peak is the largest one (module doc)."""
    prompts, T = w.languages * VERIFY_PER_LANGUAGE, VERIFY_TOKENS
    n_ctx = w.max_length + GGUF_VERIFY_EXTRA
    branches: dict[str, dict[str, int]] = {}
    if w.lora_verify:  # base + delta, base + the adapter's files, PEFT, (the kept-only delta)
        branches["PEFT check"] = {
            "one fp32 model (+ its LoRA factors)": m.params * 4 + w.top_k * m.block_params * 4,
            "delta fp32": w.top_k * m.block_params * 4,
            "kept logits of 4 passes [prompts, 64, V] fp32": 4 * prompts * T * m.vocab * 4,
        }
    if w.gguf_lora:  # llama.cpp: the base GGUF + the LoRA, then the folded GGUF
        gg = GGUF_BYTES.get(w.gguf_lora.lower(), 4.0)
        branches["llama.cpp LoRA check"] = {
            f"base GGUF ({w.gguf_lora}) + LoRA, mapped": int(m.params * gg)
            + int(w.top_k * m.block_params * gg),
            "logits of every position [n_ctx, V] fp32 (two copies)": 2 * n_ctx * m.vocab * 4,
        }
    if w.cv_verify:
        branches["control vector check"] = {
            "transformers fp32 model": m.params * 4,
            "base GGUF (f16), mapped": m.params * 2,
            "logits of every position [n_ctx, V] fp32 (two copies)": 2 * n_ctx * m.vocab * 4,
        }
    need = Need()
    need.device["~process"] = CPU_BASE
    if not branches:
        return need
    name = max(branches, key=lambda k: sum(branches[k].values()))
    need.note = f"largest: {name}"
    need.device.update({f"{name}: {k}": v for k, v in branches[name].items()})
    return need
