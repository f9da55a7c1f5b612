"""Keeping Hugging Face tokens out of what we print and publish."""

from __future__ import annotations

import re

# A user access token: "hf_" followed by 30-40 letters and digits.
TOKEN_SHAPE = re.compile(rb"hf_[A-Za-z0-9]{30,40}(?![A-Za-z0-9])")
_TOKEN_TEXT = re.compile(r"hf_[A-Za-z0-9]{10,}")


def scrub(text: str, token: str | None = None) -> str:
    """Remove a token (and anything shaped like a Hugging Face token) from a string."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_TEXT.sub("hf_***", text)


def find_secret(data: bytes, token: str | None = None) -> str | None:
    """Why ``data`` must not be published, or None: it holds ``token`` or a token-shaped
    string."""
    if token and token.encode() in data:
        return "contains your Hugging Face token"
    if TOKEN_SHAPE.search(data):
        return "contains a string shaped like a Hugging Face token (hf_...)"
    return None
