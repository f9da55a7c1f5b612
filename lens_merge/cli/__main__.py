"""``python -m lens_merge.cli`` (used with ``accelerate launch -m lens_merge.cli train ...``)."""

from lens_merge.cli import main

main()
