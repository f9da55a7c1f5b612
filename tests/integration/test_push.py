"""Push against a stand-in Hub on 127.0.0.1, driven by the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
from pathlib import Path

import pytest

from lens_merge.errors import PublishError
from tests._release import NAME, build_release, record_all
from tests.hub_server import StandInHub

TOKEN = "hf_" + "Zq7LmN3xR8vTb2Kd9WcYp4Hs6Jf1Ga5Ue0"
REPO = "tester/tiny-lens"
LFS_THRESHOLD = 64 << 10  # the Hub's is 10 MB; tokenizer.json (~124 KiB) must go through LFS here


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """conftest sets HF_HUB_OFFLINE=1 (read at import); the push tests talk to 127.0.0.1."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    yield
    reset_sessions()


@pytest.fixture(scope="module")
def release_template(tmp_path_factory, tiny_model) -> Path:
    from lens_merge.release.card import write_card

    root = build_release(tmp_path_factory.mktemp("rel") / NAME, tiny_model("llama"))
    write_card(root)
    return root


@pytest.fixture
def release(tmp_path, release_template) -> Path:
    return Path(shutil.copytree(release_template, tmp_path / NAME))


@pytest.fixture
def hub(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    caplog.set_level(logging.DEBUG, logger="lens_merge")
    caplog.set_level(logging.DEBUG, logger="urllib3")
    with StandInHub(TOKEN, lfs_threshold=LFS_THRESHOLD) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield h


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def assert_token_only_in_auth_header(hub: StandInHub, *texts: str) -> None:
    authed = 0
    for r in hub.state.requests:
        assert TOKEN not in r.path, r.path
        assert TOKEN.encode() not in r.body, r.path
        for k, v in r.headers.items():
            if k.lower() == "authorization":
                assert v == f"Bearer {TOKEN}"
                authed += 1
            else:
                assert TOKEN not in v, k
        if r.path.startswith("/api/") or ".git/info/lfs" in r.path:
            assert r.headers.get("authorization") == f"Bearer {TOKEN}", r.path
    assert authed > 0
    for t in texts:
        assert TOKEN not in t


def test_plan_layout(release):
    from lens_merge.release.push import plan_upload

    plan = plan_upload(release)
    paths = {it.path_in_repo: it for it in plan}
    for p in ("config.json", "model.safetensors.index.json", "README.md", "recipe.yaml",
              f"{NAME}-F16.gguf", "delta/lens_delta.safetensors",
              "delta/lens_delta.json", "report/lens_report.json", "report/states_2d.png",
              "report/losses.png", "report/train_log.jsonl", "lens_merge.json"):
        assert p in paths, p
    assert any(p.startswith("model-0000") and p.endswith(".safetensors") for p in paths)
    if (release / "onnx").is_dir():
        assert "onnx/model.onnx" in paths and "onnx/lens_merge_export.json" in paths
    assert not any(p.startswith(("model/", "gguf/")) for p in paths)
    for it in plan:
        assert it.size == it.local.stat().st_size
    made = [f for f in release.rglob("*") if f.is_file()
            and not f.relative_to(release).as_posix().startswith(".lens_merge/")]
    assert len(plan) == len(made)  # each file the release made, once


def test_push_roundtrip_lfs_and_no_token_leak(release, hub, caplog, capsys):
    from lens_merge.release.push import plan_upload, push, staged_card

    res = push(release, REPO)
    plan = plan_upload(release)
    files = hub.state.files(REPO)
    assert set(files) == {it.path_in_repo for it in plan}
    card = staged_card(release, REPO)
    assert f'repo = "{REPO}"' in card and "your-username/" not in card
    for it in plan:
        expected = card.encode() if it.path_in_repo == "README.md" else it.local.read_bytes()
        assert _sha(files[it.path_in_repo]) == _sha(expected), it.path_in_repo
    modes = hub.state.modes(REPO)
    sizes = {it.path_in_repo: it.size for it in plan}
    for p, m in modes.items():
        big = p.endswith((".safetensors", ".gguf", ".png", ".onnx")) or sizes[p] >= LFS_THRESHOLD
        assert m == ("lfs" if big else "regular"), p
    assert modes["tokenizer.json"] == "lfs" and modes["config.json"] == "regular"
    lfs_paths = [p for p, m in modes.items() if m == "lfs"]
    assert len(lfs_paths) >= 5 and len(hub.state.lfs_puts) == len(hub.state.lfs)
    # one commit, reported back as the server made it
    commits = hub.state.repos[REPO].commits
    assert len(commits) == 1 and res["oid"] == commits[0]["oid"]
    assert res["commit_url"] == f"{hub.url}/{REPO}/commit/{res['oid']}"
    assert res["files"] == [{"path": it.path_in_repo, "size": len(files[it.path_in_repo])}
                            for it in plan]
    # the client offered xet, the server chose basic LFS
    batch = [r for r in hub.state.requests if r.path.endswith("lfs/objects/batch")]
    assert batch and all(json.loads(r.body)["transfers"][:2] == ["basic", "multipart"]
                         for r in batch)
    assert all(r.status < 400 for r in hub.state.requests)
    out = capsys.readouterr()
    assert caplog.records  # the client's debug logs were captured
    assert_token_only_in_auth_header(hub, caplog.text, out.out, out.err, repr(res))
    assert not list(release.glob(".push-staging-*"))


def test_commit_failure_is_clear_and_retry_completes(release, hub, caplog):
    from lens_merge.release.push import push

    hub.state.fail("commit", 500)
    with pytest.raises(PublishError) as ei:
        push(release, REPO)
    msg = str(ei.value)
    assert REPO in msg and "500" in msg and "while uploading" in msg and "retry" in msg
    assert "injected commit failure" in msg and TOKEN not in msg
    assert hub.state.files(REPO) == {} and not hub.state.repos[REPO].commits
    puts = len(hub.state.lfs_puts)
    assert puts >= 5
    res = push(release, REPO)  # the retry: LFS objects are already there
    assert len(hub.state.lfs_puts) == puts
    assert len(hub.state.repos[REPO].commits) == 1 and res["oid"]
    for f in res["files"]:
        assert len(hub.state.files(REPO)[f["path"]]) == f["size"]
    assert_token_only_in_auth_header(hub, caplog.text, msg)


def test_transient_lfs_error_is_retried(release, hub):
    from lens_merge.release.push import push

    hub.state.fail("lfs_put", 503)
    push(release, REPO)
    assert len(hub.state.lfs_puts) == len(hub.state.lfs) + 1  # one PUT sent twice
    plan_sha = {_sha(b) for b in hub.state.files(REPO).values()}
    assert set(hub.state.lfs) <= plan_sha


def test_revision_branch_and_pull_request(release, hub):
    from lens_merge.release.push import push

    push(release, REPO, revision="lens-v1", private=True)
    repo = hub.state.repos[REPO]
    assert repo.private and "README.md" in hub.state.files(REPO, "lens-v1")
    assert hub.state.files(REPO, "main") == {}
    res = push(release, REPO, create_pr=True)
    assert res["pr_url"] == f"{hub.url}/{REPO}/discussions/1"
    assert "config.json" in hub.state.files(REPO, "refs/pr/1")
    assert hub.state.files(REPO, "main") == {}


def _failed_set(kind: str, variant: str) -> dict:
    from lens_merge.parity.thresholds import checks_for
    from lens_merge.records import ParitySet, parity_report

    rep = parity_report(kind, "x", "y", variant=variant, metrics={"max_abs_logit_diff": 3.0},
                        checks=checks_for({"max_abs_logit_diff": 1e-4},
                                          {"max_abs_logit_diff": 3.0}))
    return ParitySet(reports=[rep]).dump()


@pytest.mark.parametrize("rel,kind", [
    ("report/fold_verify.json", "fold"), ("report/gguf_verify.json", "gguf"),
    ("report/onnx_verify.json", "onnx"), ("onnx/lens_merge_export.json", "onnx-record"),
])
def test_refuses_failed_verification(release, hub, rel, kind):
    from lens_merge.release.push import push

    (release / rel).parent.mkdir(exist_ok=True)
    if kind == "onnx-record":
        (release / "report/onnx_verify.json").unlink(missing_ok=True)
        content = {"verification": _failed_set("onnx", "fp32")}
    else:
        content = _failed_set(kind, "x")
    (release / rel).write_text(json.dumps(content))
    record_all(release)
    for dry in (True, False):
        with pytest.raises(PublishError, match=r"verification failed.*refusing to publish"):
            push(release, REPO, dry_run=dry)
    assert hub.state.requests == []


def test_refuses_missing_card_model_and_token_in_files(release, hub):
    from lens_merge.release.push import push

    (release / "report" / "notes.txt").write_text(f"debug: token={TOKEN}\n")
    record_all(release)  # even a file the release lists is scanned
    with pytest.raises(PublishError, match="report/notes.txt: contains your Hugging Face token"):
        push(release, REPO)
    (release / "report" / "notes.txt").unlink()
    record_all(release)
    (release / "README.md").unlink()
    with pytest.raises(PublishError, match="lens-merge card"):
        push(release, REPO)
    shutil.rmtree(release / "model")
    with pytest.raises(PublishError, match="model"):
        push(release, REPO)
    assert hub.state.requests == []


def test_bad_token_is_scrubbed(release, hub, monkeypatch):
    from huggingface_hub import constants

    from lens_merge.release.push import push

    wrong = "hf_" + "A" * 30
    with pytest.raises(PublishError) as ei:
        push(release, REPO, token=wrong)
    assert "401" in str(ei.value) and wrong not in str(ei.value)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(release / "no-token-here"))
    with pytest.raises(PublishError, match="no Hugging Face token"):
        push(release, REPO)


def test_dry_run_contacts_nothing(release, hub, monkeypatch):
    from typer.testing import CliRunner

    from lens_merge.cli import app
    from lens_merge.release.push import push

    def refuse(*a, **k):
        raise AssertionError("dry run opened a connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    res = push(release, REPO, dry_run=True)
    assert res["dry_run"] and "commit_url" not in res
    assert "base_model_relation: finetune" in res["card"] and f'"{REPO}"' in res["card"]
    assert res["total_bytes"] == sum(f["size"] for f in res["files"])
    out = CliRunner().invoke(app, ["push", str(release), "--repo-id", REPO, "--dry-run"],
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    assert f"{NAME}-F16.gguf" in out.output and "base_model_relation: finetune" in out.output
    assert "nothing was uploaded" in out.output
    assert hub.state.requests == []


def test_cli_card_and_push(release, hub):
    from typer.testing import CliRunner

    from lens_merge.cli import app

    runner = CliRunner()
    (release / "README.md").unlink()
    out = runner.invoke(app, ["card", str(release), "--repo-id", REPO], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert (release / "README.md").is_file() and "report/states_2d.png: written" in out.output
    out = runner.invoke(app, ["push", str(release), "--repo-id", REPO], terminal_width=200)
    assert out.exit_code == 0, out.output
    oid = hub.state.repos[REPO].commits[0]["oid"]
    assert f"commit: {hub.url}/{REPO}/commit/{oid}" in out.output
    assert TOKEN not in out.output


def test_only_the_manifest_travels(release, hub, tmp_path):
    """A log holding the token and a symlink to a token file, left in the release by hand,
    are not part of the release: neither is uploaded (issue 11's reproductions)."""
    from lens_merge.release.push import plan_upload, push

    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    (release / "report" / "upload.log").write_text(f"HF_TOKEN={TOKEN}\n")
    (release / "report" / "token").symlink_to(secret)
    planned = {it.path_in_repo for it in plan_upload(release)}
    assert "report/upload.log" not in planned and "report/token" not in planned
    push(release, REPO)
    files = hub.state.files(REPO)
    assert "report/upload.log" not in files and "report/token" not in files
    assert_token_only_in_auth_header(hub)


def test_listed_file_replaced_by_link_or_changed_is_refused(release, hub, tmp_path):
    from lens_merge.release.push import push

    target = release / "report" / "lens_report.json"
    target.write_text(target.read_text() + " ")
    with pytest.raises(PublishError, match="lens_report.json: changed since"):
        push(release, REPO, dry_run=True)
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(PublishError, match="lens_report.json: is a symbolic link"):
        push(release, REPO)
    assert hub.state.requests == []


def test_token_shaped_string_in_a_binary_file_is_refused(release, hub, monkeypatch):
    from lens_merge.release.push import push

    shard = next((release / "model").glob("*.safetensors"))
    other = "hf_" + "Q" * 34
    with open(shard, "ab") as fh:
        fh.write(b"\x00\x01" + other.encode() + b"\x00")
    record_all(release)
    for dry in (True, False):
        with pytest.raises(PublishError, match=rf"{shard.name}: contains a string shaped like"):
            push(release, REPO, dry_run=dry)
    assert hub.state.requests == []
