"""The ONNX stage's memory shape: the exporter and the quantizer run in child processes whose
peaks count in the stage's, the dynamo export child grows by about one copy of the weights,
and verification holds one model (or session) at a time."""

from __future__ import annotations

import gc
import weakref

import pytest

pytest.importorskip("optimum.onnxruntime")


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory):
    from lens_merge import memory
    from lens_merge.export.onnx import export_onnx

    src = tiny_model("llama")
    out = tmp_path_factory.mktemp("onnx-mem") / "llama"
    memory.reset_peak()
    assert memory._children["peak"] == 0
    rec = export_onnx(src, out, quantize="int8")
    return src, out, rec, memory._children["peak"]


def test_export_runs_in_a_child_whose_peak_counts(export):
    from lens_merge import memory

    src, out, rec, child = export
    assert (out / "model.onnx").is_file() and (out / "model_int8.onnx").is_file()
    assert rec["quantized"]["method"] == "weight_only" and rec["export_seconds"] > 0
    # a Python process with torch imported is over 100 MB: the child's peak was noted
    assert child > 100e6
    assert memory._children["peak"] == child and memory.peak_rss() >= child
    memory.reset_peak()
    assert memory._children["peak"] == 0 and memory.peak_rss() == memory.own_peak_rss()


def test_export_and_quantize_children_record_their_peaks(export):
    _, _, rec, child = export
    peaks = rec["child_peak_rss"]
    assert set(peaks) == {"export", "quantize"} and child == max(peaks.values())
    assert peaks["export"] > 100e6 and peaks["quantize"] > 50e6


# about 40M parameters: 160 MB of fp32 weights, enough to stand out of a Python process's noise
WIDE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32768,
        "tie_word_embeddings": False}


def test_dynamo_export_child_holds_one_copy_of_the_weights(export, tiny_tokenizer_dir,
                                                           tmp_path):
    """Issue 12: optimum's TorchScript path holds the ModelProto, its serialized string and
    the Python bytes at once (measured here: the child grows by 3.7x the graph's bytes over the
    tiny model's; SmolLM2-135M: 3.0 GB). The dynamo path streams the weights to external data:
    measured 1.27x (the model plus one tensor). The limit, 2x, leaves room for noise and
    still fails the old path; the quantizer's child (its own process) stays below it."""
    from lens_merge.export.onnx import export_onnx
    from lens_merge.testing import TINY_CONFIGS, build_random_model

    small = export[2]["child_peak_rss"]
    src = build_random_model({**TINY_CONFIGS["llama"], **WIDE}, tmp_path / "wide",
                             tokenizer_from=tiny_tokenizer_dir, max_shard_size="2GB")
    rec = export_onnx(src, tmp_path / "onnx", quantize="int8")
    weights, peaks = rec["graph_bytes"], rec["child_peak_rss"]
    assert 150e6 < weights < 170e6 and rec["options"]["exporter"] == "dynamo"
    grew = peaks["export"] - small["export"]
    assert 0.8 * weights < grew < 2.0 * weights, (grew / weights, peaks, small)
    assert peaks["quantize"] < peaks["export"]


def test_child_errors_are_export_errors(tmp_path):
    from lens_merge.errors import ExportError
    from lens_merge.export.onnx._child import run_in_child

    with pytest.raises(ExportError, match="unknown child job 'nope'"):
        run_in_child("nope")
    (tmp_path / "t").mkdir()
    with pytest.raises(ExportError) as ei:  # the child's own ExportError, message kept
        run_in_child("export_graph", src=str(tmp_path / "missing"), tmp=str(tmp_path / "t"),
                     dtype="fp32", model_type="llama")
    assert "torch dynamo ONNX export (llama" in str(ei.value) and "missing" in str(ei.value)


def test_verify_holds_one_model_at_a_time(export, monkeypatch):
    import lens_merge.export.onnx.verify as verify
    import lens_merge.models as models

    src, out, _, _ = export
    alive, loads = [], []

    def tracked(real, what):
        def load(*args, **kwargs):
            gc.collect()
            held = [r() for r in alive if r() is not None]
            assert not held, f"{what} loaded while {len(held)} model(s) are held"
            obj = real(*args, **kwargs)
            alive.append(weakref.ref(obj))
            loads.append(what)
            return obj
        return load

    monkeypatch.setattr(models, "load_model", tracked(models.load_model, "torch"))
    monkeypatch.setattr(verify, "load_ort", tracked(verify.load_ort, "ort"))
    res = verify.verify_onnx(src, out, languages=["en", "zh"], max_new_tokens=8)
    assert loads == ["torch", "ort", "ort"]
    fp, q = res.reports
    assert fp.passed and fp.metrics["generation_match"] == 1.0
    assert fp.metrics["max_abs_logit_diff"] < 1e-4 and q.variant == "int8"
