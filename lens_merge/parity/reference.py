"""transformers' side of a parity check, run once per checkpoint and prompt.

GGUF and ONNX verification compare their engine with the same thing: the folded checkpoint in
transformers (fp32, eager attention) on the same chat-formatted prompts, its logits at every
prompt position and its greedy continuation with each step's logits. ``References`` keeps
those per (prompt ids, new tokens, stop ids) for one checkpoint: in memory, and with a folder
on disk as well, so the release pipeline's ONNX check reads what its GGUF check ran (about
25 s of the default run's 2 cores) and a rerun of either reads both.

The folder must belong to one checkpoint's content (the pipeline names it by the folded
model's hash); a file is written whole or not at all and read only when its key matches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class Greedy:
    """One prompt's reference: ``logits`` [T, V] fp32 at the prompt positions, the greedy
    ``tokens`` (cut after the first stop id, which is kept) and ``steps`` [len(tokens), V],
    the logits each token was chosen from."""

    logits: torch.Tensor
    tokens: list[int]
    steps: torch.Tensor


class References:
    """transformers' logits and greedy continuations of one checkpoint, computed once.

    Args:
        checkpoint: the local HF directory (the model is loaded on first need, in fp32).
        folder: where to keep them on disk (None: in memory only).
    """

    def __init__(self, checkpoint: str | Path, folder: str | Path | None = None) -> None:
        self.checkpoint = Path(checkpoint)
        self.folder = None if folder is None else Path(folder)
        self._kept: dict[str, Greedy] = {}
        self._model = None
        self.computed = 0  # prompts the model ran (the rest were read)

    def get(self, ids: list[int], max_new: int, stop: set[int] | list[int]) -> Greedy:
        """The reference of the prompt ``ids``: ``max_new`` greedy tokens at most, ending at
        the first id of ``stop``."""
        stop = sorted({int(i) for i in stop})
        key = hashlib.sha256(json.dumps([list(map(int, ids)), int(max_new), stop])
                             .encode()).hexdigest()[:32]
        if key in self._kept:
            return self._kept[key]
        got = self._read(key)
        if got is None:
            got = self._run(ids, max_new, stop)
            self._write(key, got)
        self._kept[key] = got
        return got

    def close(self) -> None:
        """Free the model (the references stay)."""
        if self._model is not None:
            from lens_merge.memory import release_memory

            self._model = None
            release_memory()

    def _run(self, ids: list[int], max_new: int, stop: list[int]) -> Greedy:
        import torch

        from lens_merge.models import load_model

        if self._model is None:
            self._model = load_model(self.checkpoint, dtype="fp32")
        x = torch.tensor([list(ids)])
        with torch.inference_mode():
            logits = self._model(input_ids=x).logits[0].float()
            out = self._model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                temperature=None, top_p=None, top_k=None, eos_token_id=stop,
                pad_token_id=stop[0] if stop else None, return_dict_in_generate=True,
                output_logits=True)
        new = out.sequences[0, len(ids):].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stop), len(new))
        self.computed += 1
        steps = (torch.stack([s[0].float() for s in out.logits[:cut]]) if cut
                 else logits.new_empty((0, logits.shape[-1])))
        return Greedy(logits, new[:cut], steps)

    def _read(self, key: str) -> Greedy | None:
        if self.folder is None or not (self.folder / f"{key}.safetensors").is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(self.folder / f"{key}.safetensors")
        return Greedy(t["logits"], t["tokens"].tolist(), t["steps"])

    def _write(self, key: str, g: Greedy) -> None:
        if self.folder is None:
            return
        import torch
        from safetensors.torch import save_file

        from lens_merge.files import atomic_file

        with atomic_file(self.folder / f"{key}.safetensors") as tmp:
            save_file({"logits": g.logits.contiguous(), "steps": g.steps.contiguous(),
                       "tokens": torch.tensor(g.tokens, dtype=torch.long)}, str(tmp))


def generation_eos(checkpoint: Path) -> list[int]:
    """The eos ids of the checkpoint's generation config (what transformers stops on)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(checkpoint)).eos_token_id
    except OSError:  # no generation_config.json: transformers falls back to the model config
        eos = json.loads((Path(checkpoint) / "config.json").read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if eos is not None else []
