"""Weights on disk: checkpoint reading, the shard writer, the Lens delta, fold and unfold.

- ``checkpoint``: safetensors/pickle checkpoints, their index and tensor entries.
- ``delta``: the Lens delta (``lens_delta.safetensors`` + ``lens_delta.json``).
- ``fold``: the delta streamed into (or out of) the base shards; its parts: ``_source``
  (open the input, check the delta fits it), ``_write`` (write the output atomically),
  ``_tensors`` (W +- dW, hashes), ``_report`` (``FoldReport``, the provenance file's name).
- ``verify``: base + delta in memory vs the folded checkpoint (a ``ParityReport``).
"""
