"""ONNX export through optimum-onnx, checked in ONNX Runtime against transformers.

Tiny random models (one export per architecture the exporter can run) and, marked slow, the
real default model. The KV-cache path is exercised by ``ORTModelForCausalLM.generate``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import requires_onnx

pytestmark = [requires_onnx, pytest.mark.onnx]

FAST = {"languages": ["en", "zh"], "max_new_tokens": 16}  # other archs: 2 prompts, 16 tokens


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models on 2 shared cores: thread contention costs more than it gives."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def llama_export(tiny_model, tmp_path_factory):
    """Tiny Llama exported fp32 + int8 and verified on every default language, 32 tokens."""
    from lens_merge.export.onnx import export_onnx, verify_onnx

    src = tiny_model("llama")
    out = tmp_path_factory.mktemp("onnx") / "llama"
    rec = export_onnx(src, out, quantize="int8")
    rep = verify_onnx(src, out)
    return src, out, rec, rep


def test_llama_layout_and_provenance(llama_export):
    import onnx

    src, out, rec, _ = llama_export
    from lens_merge.files import TEMP_MARK

    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "model.onnx_data", "model_int8.onnx", "config.json",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "lens_merge_export.json"} <= names
    assert not [p for p in out.parent.iterdir() if TEMP_MARK in p.name]  # no temp left
    assert {p.name for p in out.parent.iterdir()} == {"llama"}
    on_disk = json.loads((out / "lens_merge_export.json").read_text())
    assert on_disk["source"]["path"] == str(Path(src).resolve())
    assert on_disk["options"] == {**rec["options"]}
    assert rec["options"]["dtype"] == "fp32" and rec["options"]["kv_heads"] == 2
    assert rec["options"]["exporter"] == "dynamo" and rec["options"]["external_data"]
    assert rec["options"]["opset"] == 18
    assert rec["tool"]["optimum-onnx"] and rec["tool"]["onnxruntime"] and rec["tool"]["onnxscript"]
    assert rec["graph_bytes"] == sum(rec["files"][k]["bytes"] for k in ("model.onnx",
                                                                        "model.onnx_data"))
    # each graph's external data is named as optimum's from_pretrained fetches it from the Hub
    # (file_name + "_data"), onnxruntime's quantizer's "<graph>.data" renamed
    assert "model_int8.onnx_data" in names and "model_int8.onnx.data" not in names
    int8 = onnx.load(str(out / "model_int8.onnx"), load_external_data=False)
    assert {e.value for t in int8.graph.initializer for e in t.external_data
            if e.key == "location"} == {"model_int8.onnx_data"}
    for name in ("model.onnx", "model.onnx_data", "model_int8.onnx", "tokenizer.json"):
        assert rec["files"][name]["sha256"] == _sha256(out / name)
        assert rec["files"][name]["bytes"] == (out / name).stat().st_size
    assert rec["export_seconds"] > 0
    # int8 graph is smaller than fp32 (measured 0.76); weight-only MatMulNBits leaves the
    # embedding (a Gather), a third of this tiny model, in fp32
    assert rec["quantized"]["method"] == "weight_only" and rec["quantized"]["bits"] == 8
    assert rec["quantized"]["bytes"] < rec["graph_bytes"]
    assert rec["quantized"]["size_ratio_to_fp"] == pytest.approx(
        rec["quantized"]["bytes"] / rec["graph_bytes"], abs=1e-4)
    # independent reader: the checker and the KV-cache inputs/outputs of the graph
    onnx.checker.check_model(str(out / "model.onnx"))
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ins, outs = {i.name: i for i in g.input}, {o.name for o in g.output}
    for i in range(4):
        assert f"past_key_values.{i}.key" in ins and f"present.{i}.value" in outs
    dims = ins["past_key_values.0.key"].type.tensor_type.shape.dim
    assert [dims[1].dim_value, dims[3].dim_value] == [2, 16]
    assert [d.dim_param for d in ins["attention_mask"].type.tensor_type.shape.dim] == [
        "batch_size", "past_sequence_length + sequence_length"]
    # weights named after the checkpoint; every linear weight stored transposed as the
    # MatMul's B (what the int8 quantizer needs); the tied embedding is stored once, read by
    # Gather and (transposed at run time) by lm_head, as in optimum's graph
    inits = {t.name: list(t.dims) for t in g.initializer}
    assert inits["model.embed_tokens.weight"] == [2048, 64] and "lm_head.weight" not in inits
    assert inits["model.layers.0.self_attn.k_proj.weight"] == [64, 32]
    assert inits["model.layers.3.mlp.down_proj.weight"] == [128, 64]
    assert [n.input[0] for n in g.node if n.op_type == "Transpose" and n.input[0] in inits] == [
        "model.embed_tokens.weight"]


def test_llama_verification_numbers(llama_export):
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.export.onnx import onnx_verification_status, read_export_record
    from lens_merge.records import ParitySet

    _, out, _, result = llama_export
    assert isinstance(result, ParitySet) and result.passed, result.failures
    rep, q = result.reports
    assert (rep.kind, rep.variant, q.kind, q.variant) == ("onnx", "fp32", "onnx", "int8")
    assert rep.passed and rep.problems == [], rep.failures
    assert {c.name for c in rep.checks} == {"worst_diff_to_tolerance",
                                            "kv_step_worst_diff_to_tolerance", "generation_match"}
    assert rep.languages == DEFAULT_LANGUAGES and rep.n_prompts == 10
    assert rep["max_abs_logit_diff"] <= 1e-4 and rep["kv_step_max_abs_logit_diff"] <= 1e-4
    assert rep["worst_diff_to_tolerance"] <= 1.0 and rep["kv_step_worst_diff_to_tolerance"] <= 1.0
    assert rep["generation_match"] == 1.0 and rep["generations_equal"] == 10
    assert all(g["tokens"] == 32 and g["equal"] for g in rep["generations"])
    assert rep["top1_agreement"] == 1.0 and rep["top1_agreement_all_positions"] == 1.0
    assert rep["tokenizer_match"] and rep["files_unchanged"]
    assert q.passed and {c.name for c in q.checks} == {"top1_agreement", "kl_mean"}
    assert q["n_positions"] > 100 and q["n_contexts"] <= q["n_positions"]
    assert 0.8 <= q["top1_agreement"] <= 1.0 and q["method"] == "weight_only"
    assert 0.8 <= q["top1_agreement_all_positions"] <= 1.0
    assert 0.0 < q["kl_mean"] < 0.01 and q["kl_max"] >= q["kl_mean"]  # int8 differs, a bit
    assert rep["tolerance_rule"] == {"atol": 1e-4, "rtol": 1e-5}
    assert all(d["tolerance"] == 1e-4 for d in rep.per_language.values())  # |logit| < 10
    stored = read_export_record(out)["verification"]
    assert stored == result.dump()
    assert stored["reports"][0]["metrics"]["max_abs_logit_diff"] == rep["max_abs_logit_diff"]
    assert onnx_verification_status(out) == "passed"


def test_raw_onnxruntime_matches_transformers(llama_export):
    """Without optimum: a bare InferenceSession with an empty past gives transformers' logits."""
    import onnxruntime as ort
    import torch

    from lens_merge.models import load_model
    from lens_merge.testing import TINY_VOCAB

    src, out, _, _ = llama_export
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 520, 1300, 77, 2001, 42, 2]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name == "position_ids":
            feed[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((1, 2, 0, 16), dtype=np.float32)
    logits = sess.run(["logits"], feed)[0]
    with torch.inference_mode():
        ref = load_model(src)(torch.from_numpy(ids)).logits.numpy()
    assert logits.shape == ref.shape == (1, 7, TINY_VOCAB)
    assert np.abs(logits - ref).max() < 1e-4


def test_tampered_graph_fails_and_is_marked(llama_export, tmp_path):
    import onnx
    from onnx import numpy_helper

    from lens_merge.errors import VerificationError
    from lens_merge.export.onnx import onnx_verification_status, verify_onnx

    src, out, _, _ = llama_export
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = onnx.load(str(bad / "model.onnx"))
    init = next(t for t in m.graph.initializer if t.name == "model.norm.weight")
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.05, init.name))
    onnx.save(m, str(bad / "model.onnx"))
    with pytest.raises(VerificationError) as ei:
        verify_onnx(src, bad, **FAST)
    result = ei.value.report
    rep, q = result.reports
    assert not result.passed and rep.status == "failed" and rep["max_abs_logit_diff"] > 1e-3
    worst = next(c for c in rep.checks if c.name == "worst_diff_to_tolerance")
    assert not worst.passed and worst.value > 10  # > 1e-3 against a tolerance of 1e-4
    assert not rep["files_unchanged"] and rep["changed_files"] == ["model.onnx"]
    assert any("model.onnx" in p for p in rep.problems)
    assert q.passed  # the int8 graph was not touched
    assert "max |logit diff|" in str(ei.value)
    assert (bad / "model.onnx").is_file()  # kept, but marked
    on_disk = json.loads((bad / "lens_merge_export.json").read_text())
    assert on_disk["verification"]["reports"][0]["passed"] is False
    assert onnx_verification_status(bad) == "failed"
    assert onnx_verification_status(tmp_path) == "missing"


def test_stored_verification_is_a_parity_set(llama_export, tmp_path):
    """The mark is read back through records.ParitySet: anything else is not a pass."""
    from lens_merge.export.onnx import onnx_verification_status, read_export_record

    _, out, _, _ = llama_export
    for name, verification, status in [
            ("none", None, "not_run"), ("old-mark", {"status": "not_run"}, "not_run"),
            ("old-shape", {"status": "passed", "max_abs_logit_diff": 0.0}, "failed"),
            ("no-reports", {"reports": []}, "failed")]:
        d = tmp_path / name
        shutil.copytree(out, d)
        rec = read_export_record(d)
        rec["verification"] = verification
        (d / "lens_merge_export.json").write_text(json.dumps(rec))
        assert onnx_verification_status(d) == status, name
    (tmp_path / "none" / "lens_merge_export.json").write_text('{"format": "other"}')
    assert onnx_verification_status(tmp_path / "none") == "missing"


def test_int8_limits_pass_measured_numbers_and_flag_broken_graphs():
    """The onnx int8 rows can fail: dynamic-quality numbers fail the weight-only row, and a
    graph with wrong weights (top-1 near chance, KL of nats) fails both."""
    from lens_merge.export.onnx.verify import int8_variant
    from lens_merge.parity.thresholds import checks_for, thresholds_for

    def ok(variant, top1, kl):
        return all(c.passed for c in checks_for(thresholds_for("onnx", variant),
                                                 {"top1_agreement": top1, "kl_mean": kl}))

    assert int8_variant("weight_only") == "int8" and int8_variant("dynamic") == "int8_dynamic"
    assert ok("int8", 0.947, 0.0042) and ok("int8_dynamic", 0.47, 1.0)
    assert not ok("int8", 0.47, 1.0) and not ok("int8", 0.947, 0.2)
    assert not ok("int8_dynamic", 0.05, 6.0) and not ok("int8_dynamic", 0.47, 5.0)


def test_dynamic_int8_is_smaller_and_runs(llama_export, tmp_path):
    """The other int8 method (onnxruntime quantize_dynamic) also quantizes the embedding."""
    import onnx
    import onnxruntime as ort

    from lens_merge.export.onnx import quantize_int8

    _, out, rec, _ = llama_export
    opts = quantize_int8(out / "model.onnx", tmp_path / "d.onnx", False, "dynamic")
    assert opts["method"] == "dynamic" and opts["activations"] == "uint8 dynamic"
    # 2048-token tiny vocabulary: measured 0.44 of the fp32 graph (weight-only: 0.76)
    size = (tmp_path / "d.onnx").stat().st_size
    assert size < 0.5 * rec["graph_bytes"] and size < 0.7 * rec["quantized"]["bytes"]
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    g = onnx.load(str(tmp_path / "d.onnx")).graph
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in g.node}
    inits = {t.name: t for t in g.initializer}
    assert "model.embed_tokens.weight" not in inits
    emb = inits["model.embed_tokens.weight_quantized"]
    assert emb.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    assert sess.get_outputs()[0].name == "logits"


def test_existing_output_needs_overwrite(llama_export):
    from lens_merge.errors import ExportError
    from lens_merge.export.onnx import export_onnx

    src, out, _, _ = llama_export
    before = _sha256(out / "model.onnx")
    with pytest.raises(ExportError, match="already exists"):
        export_onnx(src, out)
    with pytest.raises(ExportError, match="dtype 'bf16' unknown"):
        export_onnx(src, out.parent / "x", dtype="bf16")
    with pytest.raises(ExportError, match="starts from the fp32 graph"):
        export_onnx(src, out.parent / "x", dtype="fp16", quantize="int8")
    assert _sha256(out / "model.onnx") == before and not (out.parent / "x").exists()


def test_output_onto_the_checkpoint_is_refused(tiny_model, tmp_path):
    """Issue 11: `export onnx W/f1 -o W/f1 --overwrite` used to delete the checkpoint, exit 0."""
    from lens_merge.errors import OutputError
    from lens_merge.export.onnx import export_onnx

    src = Path(shutil.copytree(tiny_model("llama"), tmp_path / "f1"))
    before = {p.name: _sha256(p) for p in src.iterdir()}
    for out in (src, src / "onnx", tmp_path):
        with pytest.raises(OutputError, match="choose an output outside the inputs"):
            export_onnx(src, out, overwrite=True)
    assert {p.name: _sha256(p) for p in src.iterdir()} == before


def test_unsupported_model_type_names_it_and_the_supported(tmp_path):
    from lens_merge.errors import ExportError
    from lens_merge.export.onnx import export_onnx

    src = tmp_path / "mamba"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64,
                                                 "num_hidden_layers": 2, "vocab_size": 100}))
    with pytest.raises(ExportError) as ei:
        export_onnx(src, tmp_path / "out")
    msg = str(ei.value)
    assert "'mamba'" in msg and "text-generation-with-past" in msg
    assert "gemma2, llama, mistral, phi3, qwen2, qwen3" in msg
    assert not (tmp_path / "out").exists()


def test_kv_geometry_agrees_with_ort_or_is_refused(tiny_model, tmp_path):
    """ORTModelForCausalLM's empty-past shape must equal the model's: asked of the real class."""
    from transformers import AutoConfig

    from lens_merge.errors import ExportError
    from lens_merge.export.onnx import export_onnx, model_cache_geometry, ort_cache_geometry
    from lens_merge.testing import TINY_CONFIGS

    def cfg(family, **kw):
        c = {**TINY_CONFIGS[family], **kw}
        return AutoConfig.for_model(c.pop("model_type"), **c)

    for fam in ("llama", "mistral", "qwen2", "qwen3"):
        assert ort_cache_geometry(cfg(fam)) == model_cache_geometry(cfg(fam)) == (2, 16)
    # ORT (optimum-onnx 0.1.0) uses num_attention_heads for phi3/gemma2 and
    # hidden_size // heads for qwen3: GQA phi3/gemma2 and Qwen3-0.6B-like head_dim break
    assert ort_cache_geometry(cfg("phi3", num_key_value_heads=2)) == (4, 16)
    assert ort_cache_geometry(cfg("gemma2")) == (4, 16) != model_cache_geometry(cfg("gemma2"))
    assert ort_cache_geometry(cfg("qwen3", head_dim=32)) == (2, 16)
    with pytest.raises(ExportError, match="num_key_value_heads == num_attention_heads"):
        export_onnx(tiny_model("gemma2"), tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("family", ["qwen3", "phi3", "phi3-longrope", "llama3", "gemma2-mha",
                                    "mistral-fp16"])
def test_other_architectures_export_and_verify(family, tiny_model, tiny_tokenizer_dir,
                                               tmp_path):
    from lens_merge.export.onnx import export_onnx, onnx_verification_status, verify_onnx
    from lens_merge.testing import TINY_CONFIGS, build_random_model

    dtype = "fp16" if family.endswith("fp16") else "fp32"
    if family == "gemma2-mha":  # gemma2 runs in ORT only without GQA (see the geometry test)
        src = build_random_model({**TINY_CONFIGS["gemma2"], "num_key_value_heads": 4},
                                 tmp_path / "src", tokenizer_from=tiny_tokenizer_dir)
    else:
        src = tiny_model(family.removesuffix("-fp16"))
    out = tmp_path / "onnx"
    rec = export_onnx(src, out, dtype=dtype)
    assert rec["options"]["dtype"] == dtype and onnx_verification_status(out) == "not_run"
    assert rec["options"]["exporter"] == "dynamo"
    result = verify_onnx(src, out, **FAST)
    assert result.passed and [r.variant for r in result.reports] == [dtype], result.failures
    rep = result.reports[0]
    tol = 5e-2 if dtype == "fp16" else 1e-4  # atol: these tiny models have |logit| < 6
    assert rep["tolerance"] == tol and rep["max_abs_logit_diff"] <= tol
    assert rep["generation_match_with_ties"] == 1.0
    if dtype == "fp16":  # the fp16 graph really is fp16: its error is far above fp32's
        assert rep["max_abs_logit_diff"] > 1e-4
        # random tiny models have near-ties; fp16 may flip one only within 2 x tolerance
        assert rep["generations_equal"] + rep["generations_tie_excused"] == 2
        for g in rep["generations"]:
            assert g["equal"] or g["ref_top2_margin_at_mismatch"] <= 2 * g["tolerance"]
    else:
        assert rep["generations_equal"] == 2 and rep["generations_tie_excused"] == 0
    assert onnx_verification_status(out) == "passed"
    if family == "qwen3":  # transformers' side kept in a folder: a second check reads it
        from lens_merge.parity.reference import References

        first = References(src, tmp_path / "reference")
        verify_onnx(src, out, **FAST, reference=first)
        again = References(src, tmp_path / "reference")
        second = verify_onnx(src, out, **FAST, reference=again)
        assert first.computed == 2 and again.computed == 0
        assert second.reports[0]["max_abs_logit_diff"] == rep["max_abs_logit_diff"]
        assert second.reports[0]["generations"] == rep["generations"]


def test_cli_qwen2_failure_exit_then_pass(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from lens_merge.cli import app
    from lens_merge.errors import ConfigError
    from lens_merge.export.onnx import onnx_verification_status, verify_onnx

    src, out = tiny_model("qwen2"), tmp_path / "qwen2-onnx"
    runner = CliRunner()
    bad = runner.invoke(app, ["export", "onnx", str(src), "-o", str(out), "--dtype", "bf16"])
    assert isinstance(bad.exception, ConfigError) and "--dtype" in str(bad.exception)
    # an impossible tolerance: exit 1, numbers printed, folder kept and marked failed
    res = runner.invoke(app, ["export", "onnx", str(src), "-o", str(out), "--verify",
                              "--languages", "en,ja", "--max-new-tokens", "16",
                              "--tolerance", "1e-12"])
    assert res.exit_code == 1, res.output
    assert "max |logit diff|" in res.output and "verification failed" in res.output
    assert "worst_diff_to_tolerance" in res.output  # print_parity: the failed check, named
    assert (out / "model.onnx").is_file() and onnx_verification_status(out) == "failed"
    # the same bytes verified at the default tolerance pass, and the mark follows
    result = verify_onnx(src, out, **FAST)
    rep = result.reports[0]
    assert result.passed and rep.passed and rep["max_abs_logit_diff"] <= 1e-4
    assert onnx_verification_status(out) == "passed"




def _ort_logits(graph: Path, ids: np.ndarray, positions: np.ndarray, kv: int) -> np.ndarray:
    """Logits of a bare InferenceSession with an empty past (position_ids given)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": positions}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((ids.shape[0], kv, 0, 16), dtype=np.float32)
    return sess.run(["logits"], feed)[0]


def test_longrope_switches_factors_inside_the_graph(tiny_model, tmp_path):
    """Phi-3.5 longrope picks its long factors past original_max_position_embeddings (4096):
    the dynamo graph decides per call, as transformers does (a traced graph bakes one in)."""
    import torch

    from lens_merge.export.onnx import export_onnx
    from lens_merge.models import load_model

    src, out = tiny_model("phi3-longrope"), tmp_path / "onnx"
    export_onnx(src, out)
    pt = load_model(src)
    ids = np.array([[1, 520, 1300, 77, 2001, 42]], dtype=np.int64)
    got = {}
    for start in (0, 5000):  # short factors, then long ones
        pos = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]
        logits = _ort_logits(out / "model.onnx", ids, pos, kv=4)
        with torch.inference_mode():
            ref = pt(torch.from_numpy(ids), position_ids=torch.from_numpy(pos)).logits.numpy()
        assert np.abs(logits - ref).max() < 1e-4, start
        got[start] = logits
    # the long branch really differs: a graph holding one set of factors fails one case
    assert np.abs(got[0] - got[5000]).max() > 1e-3


def test_optimum_exporter_stays_selectable_and_agrees(llama_export, tmp_path):
    """exporter="optimum" (main_export, TorchScript) writes the same interface; both graphs
    give the same logits on the same input."""
    import onnx

    from lens_merge.export.onnx import export_onnx, verify_onnx

    src, dyn, _, _ = llama_export
    out = tmp_path / "optimum"
    rec = export_onnx(src, out, exporter="optimum")
    assert rec["options"]["exporter"] == "optimum" and not rec["options"]["external_data"]
    assert not (out / "model.onnx_data").exists()
    io = [{v.name for v in (*g.input, *g.output)} for g in
          (onnx.load(str(d / "model.onnx"), load_external_data=False).graph for d in (dyn, out))]
    assert io[0] == io[1] and "present.3.value" in io[0]
    ids = np.array([[1, 520, 1300, 77, 2001, 42, 2]], dtype=np.int64)
    pos = np.arange(ids.shape[1], dtype=np.int64)[None]
    a, b = (_ort_logits(d / "model.onnx", ids, pos, kv=2) for d in (dyn, out))
    assert np.abs(a - b).max() < 1e-5
    result = verify_onnx(src, out, **FAST)
    assert result.passed and result.reports[0]["generation_match"] == 1.0


def test_exporter_option_is_checked(tiny_model, tmp_path):
    """export.onnx.exporter in a recipe, and export_onnx(exporter=...): two known names."""
    from pydantic import ValidationError

    from lens_merge._config_export import OnnxConfig
    from lens_merge.errors import ExportError
    from lens_merge.export.onnx import EXPORTERS, export_onnx

    assert EXPORTERS == ("dynamo", "optimum") and OnnxConfig().exporter == "dynamo"
    assert OnnxConfig(exporter="optimum").exporter == "optimum"
    with pytest.raises(ValidationError, match="exporter"):
        OnnxConfig(exporter="torchscript")
    with pytest.raises(ExportError, match="exporter 'torchscript' unknown; use one of dynamo"):
        export_onnx(tiny_model("llama"), tmp_path / "x", exporter="torchscript")
    assert not (tmp_path / "x").exists()
