"""The plan's constants: process baselines, GGUF bytes per weight, verification sizes."""

GiB, MiB = 1 << 30, 1 << 20
# ~ Resident size of a lens-merge process before any model: Python, torch, transformers,
# accelerate, a tokenizer (every stage on a tiny model measured 0.35-0.38 GiB).
CPU_BASE = 400 * MiB
# ~ CUDA context, cuBLAS workspace and the caching allocator's slack on the device, and the
# host memory of a process that has initialized CUDA.
CUDA_CONTEXT = 768 * MiB
CUDA_HOST_BASE = 2 * GiB
# ~ GGUF bytes per weight (K-quant mixes keep some tensors at 6 bits).
GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
              "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "q6_k": 210 / 256,
              "q5_k_m": 0.72, "q4_k_m": 0.61}
VERIFY_BATCH, VERIFY_TOKENS = 8, 64  # verify_fold's batch and prompt length
VERIFY_PER_LANGUAGE = 2  # parity prompts per language of verify_fold and the PEFT check
BENCH_TOKENS = 512  # ~ context of one lm-eval request (task-dependent)
GGUF_VERIFY_EXTRA = 48  # tokens beyond the prompt in verify_gguf's context (G + 16)
