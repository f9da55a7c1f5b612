"""ONNX export (torch's dynamo exporter, or optimum-onnx's), int8 quantization, and parity
checks in ONNX Runtime.

- ``compat``: ``check_exportable`` (exporter model types, KV-cache geometry that
  ``ORTModelForCausalLM`` can feed).
- ``export``: ``export_onnx(checkpoint, out_dir, dtype, quantize, ..., exporter)``: the graph
  of optimum's task ``text-generation-with-past`` (``exporter="dynamo"``: torch's dynamo
  exporter on a flat-KV wrapper, ``_dynamo``, weights streamed to ``model.onnx_data``;
  ``"optimum"``: optimum's ``main_export``), optional ``model_int8.onnx``, the provenance
  file ``lens_merge_export.json`` (``options.exporter``), written atomically.
- ``quantize``: the int8 copy (``weight_only`` MatMulNBits, or ``dynamic``).
- ``verify``: ``verify_onnx(checkpoint, out_dir, ...)`` -> ``records.ParitySet`` (fp graph,
  plus int8), stored in the provenance file; ``onnx_verification_status(dir)`` reads it back.

The output loads with ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(dir)``;
the int8 graph with ``file_name="model_int8.onnx"``.
"""

from lens_merge.export.onnx._record import (
    FORMAT,
    GRAPH,
    INT8_GRAPH,
    PROVENANCE_FILE,
    STATUSES,
    ExportRecord,
    onnx_verification_status,
    read_export_record,
)
from lens_merge.export.onnx.compat import (
    TASK,
    check_exportable,
    exporter_model_types,
    model_cache_geometry,
    ort_cache_geometry,
)
from lens_merge.export.onnx.export import DTYPES, EXPORTERS, export_onnx
from lens_merge.export.onnx.quantize import INT8_METHODS, QUANTIZE, quantize_int8
from lens_merge.export.onnx.verify import TOLERANCES, verify_onnx

__all__ = [
    "DTYPES",
    "EXPORTERS",
    "FORMAT",
    "GRAPH",
    "INT8_GRAPH",
    "INT8_METHODS",
    "PROVENANCE_FILE",
    "QUANTIZE",
    "STATUSES",
    "TASK",
    "TOLERANCES",
    "ExportRecord",
    "check_exportable",
    "export_onnx",
    "exporter_model_types",
    "model_cache_geometry",
    "onnx_verification_status",
    "ort_cache_geometry",
    "quantize_int8",
    "read_export_record",
    "verify_onnx",
]
