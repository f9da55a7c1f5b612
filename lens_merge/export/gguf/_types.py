"""GGUF output types: what each ``--outtype`` writes and which quantizer makes it.

Pure-Python types are quantized tensor by tensor with ``gguf.quants``; K-quants are made by
llama.cpp's own quantizer (``llama_model_quantize``) from a lossless intermediate GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass

from lens_merge.errors import ExportError


@dataclass(frozen=True)
class OutType:
    """One output type.

    Attributes:
        name: the ``--outtype`` value (``q8_0``).
        label: the file-name label (``Q8_0``), as in ``<Name>-Q8_0.gguf``.
        ggml: the ``GGMLQuantizationType`` member 2-D weights get (None for K-quants).
        file_type: the ``LlamaFileType`` member written as ``general.file_type``.
        kquant: made by llama.cpp's quantizer (needs the ``llama`` extra).
    """

    name: str
    label: str
    ggml: str | None
    file_type: str
    kquant: bool = False


OUTTYPES: dict[str, OutType] = {t.name: t for t in (
    OutType("f32", "F32", "F32", "ALL_F32"),
    OutType("f16", "F16", "F16", "MOSTLY_F16"),
    OutType("bf16", "BF16", "BF16", "MOSTLY_BF16"),
    OutType("q8_0", "Q8_0", "Q8_0", "MOSTLY_Q8_0"),
    OutType("q5_1", "Q5_1", "Q5_1", "MOSTLY_Q5_1"),
    OutType("q5_0", "Q5_0", "Q5_0", "MOSTLY_Q5_0"),
    OutType("q4_1", "Q4_1", "Q4_1", "MOSTLY_Q4_1"),
    OutType("q4_0", "Q4_0", "Q4_0", "MOSTLY_Q4_0"),
    OutType("q6_k", "Q6_K", None, "MOSTLY_Q6_K", kquant=True),
    OutType("q5_k_m", "Q5_K_M", None, "MOSTLY_Q5_K_M", kquant=True),
    OutType("q4_k_m", "Q4_K_M", None, "MOSTLY_Q4_K_M", kquant=True),
)}

# Lossless intermediate written before llama.cpp's quantizer runs, by source dtype.
INTERMEDIATE = {"F32": "f32", "F64": "f32", "BF16": "bf16", "F16": "f16"}


def get_outtype(name: str) -> OutType:
    """The output type called ``name`` (case-insensitive).

    Raises:
        ExportError: listing the supported output types.
    """
    t = OUTTYPES.get(str(name).lower())
    if t is None:
        raise ExportError(f"output type {name!r} is not supported; supported: "
                          f"{', '.join(OUTTYPES)}")
    return t


def outtype_for_file_type(file_type: int) -> OutType | None:
    """The output type whose ``general.file_type`` is ``file_type`` (None when unknown)."""
    from gguf import LlamaFileType

    for t in OUTTYPES.values():
        if int(LlamaFileType[t.file_type]) == int(file_type):
            return t
    return None


def gguf_filename(name: str, outtype: str) -> str:
    """File name of a release GGUF: ``<Name>-<LABEL>.gguf`` (``Lens-SmolLM2-F16.gguf``)."""
    return f"{name}-{get_outtype(outtype).label}.gguf"
