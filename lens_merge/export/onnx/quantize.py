"""An int8 copy of an exported fp32 graph, with onnxruntime's quantization tools.

- ``weight_only`` (default): ``MatMulNBits`` with 8-bit symmetric weights in blocks of 32,
  ``accuracy_level`` 4: ONNX Runtime multiplies in int8, quantizing each block of 32
  activations at run time. On the default model (2 AVX2 cores, batch 1): 29 ms a token vs the
  fp32 graph's 35, KL to the fp32 logits 0.010, top-1 0.969. With float compute
  (``accuracy_level`` 0, blocks of 128, the setting before session 8) the weights are
  dequantized on the fly: KL 0.004 but 138 ms a token, 4x slower than the fp32 graph.
- ``dynamic``: ``quantize_dynamic`` (per-channel QInt8 weights, uint8 activations quantized
  at run time per tensor), which outlier activations of small LLMs hurt.

The numbers each method reaches on the default model are in ``parity.thresholds`` (``onnx``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lens_merge.errors import ExportError

QUANTIZE = ("int8",)
INT8_METHODS = ("weight_only", "dynamic")
BLOCK, ACCURACY_LEVEL = 32, 4  # weight_only: see the module doc


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Keep onnxruntime's quantization tools from configuring or using the root logger."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    nbits_level = nbits.level
    root.setLevel(logging.ERROR)
    nbits.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        nbits.setLevel(nbits_level)


def quantize_int8(src: str | Path, dst: str | Path, external: bool,
                  method: str = "weight_only") -> dict[str, Any]:
    """Write an int8 copy of the graph ``src`` to ``dst``.

    Args:
        src: the fp32 graph.
        dst: the int8 graph to write.
        external: store the weights as external data (graphs over 2 GiB).
        method: one of ``INT8_METHODS``.

    Returns:
        The options used (``method``, ``tool``, ...), for the provenance record.

    Raises:
        ExportError: an unknown method, or a missing quantization dependency.
    """
    if method not in INT8_METHODS:
        raise ExportError(f"int8 method {method!r} unknown; use one of "
                          f"{', '.join(INT8_METHODS)}")
    if method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_root_logger():  # it logs a pre-processing hint on the root logger
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=False, use_external_data_format=external)
        if external:
            _hub_data_name(Path(dst))
        return {"method": "dynamic", "tool": "onnxruntime.quantization.quantize_dynamic",
                "weight_type": "QInt8", "per_channel": True, "activations": "uint8 dynamic"}
    import onnx

    # The module calls logging.basicConfig(level=INFO) when imported and logs every node.
    with _quiet_root_logger():
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as exc:  # it imports onnx_ir, which onnxruntime does not require
            raise ExportError(f"int8 weight-only quantization needs {exc.name!r} "
                              "(pip install 'lens-merge[onnx]', which pins onnx-ir)") from exc
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=BLOCK,
                                         is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)
    if external:
        _hub_data_name(Path(dst))
    return {"method": "weight_only", "tool": "onnxruntime.quantization.matmul_nbits_quantizer."
            "MatMulNBitsQuantizer", "bits": 8, "block_size": BLOCK, "symmetric": True,
            "accuracy_level": ACCURACY_LEVEL,
            "activations": f"int8 per block of {BLOCK} at run time (accuracy_level 4)"}


def _hub_data_name(graph: Path) -> None:
    """Store the graph's external data as ``<graph>_data``, the name optimum's
    ``ORTModel.from_pretrained`` downloads beside ``file_name`` from the Hub (it fetches
    ``file_name + "_data"``), instead of onnxruntime's ``<graph>.data``."""
    import onnx

    old = graph.parent / (graph.name + ".data")
    if not old.is_file():
        return
    model = onnx.load(str(graph))  # the int8 weights: a fraction of the fp32 graph's
    onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=graph.name + "_data", convert_attribute=True)
    old.unlink()
