"""lens-merge: Lens multilingual enhancement, folded into release-ready standalone models."""

__version__ = "0.1.0"

__all__ = ["__version__"]
