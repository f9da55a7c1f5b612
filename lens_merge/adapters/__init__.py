"""Lens edits as adapters users apply to the base they already have.

- ``factor``: truncated SVD of each linear weight of a delta (shared by every LoRA format).
- ``peft_lora``: a PEFT LoRA adapter folder, and its parity check against the folded model.
- ``gguf_lora``: a llama.cpp LoRA adapter GGUF.
- ``control_vector``: the probe's language directions as a llama.cpp control vector GGUF.
"""
