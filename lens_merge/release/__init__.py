"""Release: the stages of ``lens-merge run`` and what a release folder holds.

- ``stages``: every stage as one ``Stage`` (probe ... push); ``pipeline.run_recipe`` runs them.
- ``manifest``: the files the release made; ``push`` uploads exactly those.
- ``verification``: the release's parity records, read as ``records.ParitySet``.
- ``card.write_card``: README.md with ModelCard metadata, results, parity checks, usage.
- ``plots``: the card's two pictures. ``push.push``: one ``upload_folder`` commit.
- ``secrets``: token scrubbing and scanning.
"""
