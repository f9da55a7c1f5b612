"""Lens itself (lens-method.md): hidden states, the LSAR probe, cached top-K training, evaluation.

- ``hidden``: tokenization, batching and pooling of hidden states.
- ``probe``: per-language means and the language-agnostic / language-specific subspaces.
- ``train``: the training cache, the Lens losses and the trainer that yields a delta.
- ``evaluate``: base vs base+delta on held-out prompts.
"""
