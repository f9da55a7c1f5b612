"""Release to the Hugging Face Hub: model card, pictures, upload.

- ``card.write_card``: README.md with ModelCard metadata, results, parity checks, usage and
  provenance.
- ``plots.plot_states`` / ``plots.plot_losses``: the card's two pictures.
- ``push.plan_upload`` / ``push.push``: the repository layout and one ``upload_folder`` commit.
"""

from __future__ import annotations

from lens_merge.hub.card import write_card
from lens_merge.hub.push import plan_upload, push

__all__ = ["plan_upload", "push", "write_card"]
