"""``export <Hub repository id>``: the checkpoint (and the Q-Former's tokenizer repository its
config names) come from the Hugging Face cache, then export as from a folder. Offline: the test
builds a cache in the Hub's layout (models--org--name/snapshots/<commit>/..., refs/main) from the
tiny random checkpoint."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from blipdiffusion_trt.errors import CheckpointError, InputError
from blipdiffusion_trt.export import hub
from blipdiffusion_trt.package import layout

from helpers import run_cli

pytest.importorskip("huggingface_hub", reason="Hub downloads need huggingface_hub (the export extra)")

REPO_ID = "testorg/blipdiffusion-tiny"
TOKENIZER_REPO_ID = "testorg/qformer-tokenizer"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKENIZER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _add_repo(cache: Path, repo_id: str, commit: str, source: Path, ignore=None) -> Path:
    """``source``'s files as the snapshot ``commit`` of ``repo_id``, refs/main pointing at it."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot, ignore=ignore)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _hub_cache(root: Path, checkpoint: Path) -> Path:
    """A Hub cache holding the tiny checkpoint, whose Q-Former tokenizer is a repository of its own
    (as the real checkpoint's is: bert-base-uncased), plus a folder export must not need."""
    cache = root / "hub"
    snapshot = _add_repo(cache, REPO_ID, COMMIT, checkpoint, ignore=shutil.ignore_patterns("qformer_tokenizer"))
    config_path = snapshot / "qformer" / "config.json"
    config = json.loads(config_path.read_text())
    assert Path(config["tokenizer"]).is_dir()  # the fixture points at a folder inside the checkpoint
    config["tokenizer"] = TOKENIZER_REPO_ID
    config_path.write_text(json.dumps(config))
    _add_repo(cache, TOKENIZER_REPO_ID, TOKENIZER_COMMIT, checkpoint / "qformer_tokenizer")
    return cache


def _env(tmp_path: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf-home")}


def _last_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    return [line for line in proc.stderr.splitlines() if line.strip()][-1]


def test_export_from_a_repo_id_offline(tiny, tmp_path):
    cache = _hub_cache(tmp_path, tiny.checkpoint)
    out = tmp_path / "package"
    proc = run_cli("export", REPO_ID, "--out", out, "--no-validate", "--no-cpu-fusions", "--no-editing",
                   env=_env(tmp_path, cache), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == f"{REPO_ID}@{COMMIT}"
    # the Q-Former tokenizer came from its repository in the cache: the same vocabulary as the fixture's
    for name in (layout.QFORMER_TOKENIZER, layout.CLIP_TOKENIZER):
        file = layout.tokenizer_file(name)
        assert (out / file).read_bytes() == (tiny.package / file).read_bytes(), name

    # the same weights as the fixture's package (exported from the folder): the same image
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    reference = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
    images = []
    for package in (out, tiny.package):
        with BlipDiffusionRuntime.from_package(package, cpu_fused=False, threads=1) as runtime:
            images.append(runtime("a photo", reference, "dog", "dog", num_inference_steps=2, seed=0,
                                  output_type="np").images)
    # one graph of one module per side, run by the same engine with one thread: equal to float32 rounding
    np.testing.assert_allclose(images[0], images[1], rtol=0, atol=1e-6)


def test_a_missing_repo_or_revision_is_one_line(tiny, tmp_path):
    cache = _hub_cache(tmp_path, tiny.checkpoint)
    env = _env(tmp_path, cache)
    last = _last_line(run_cli("export", "testorg/no-such-model", "--out", tmp_path / "a", env=env))
    assert last.startswith("error: testorg/no-such-model:") and "cache" in last, last
    last = _last_line(run_cli("export", REPO_ID, "--revision", "v9", "--out", tmp_path / "b", env=env))
    assert last.startswith(f"error: {REPO_ID}@v9:"), last
    last = _last_line(run_cli("export", str(tiny.checkpoint), "--revision", "v9", "--out", tmp_path / "c", env=env))
    assert "--revision" in last and "local folder" in last, last
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


def test_only_what_export_reads_is_downloaded(tiny, tmp_path, monkeypatch):
    """The patterns asked of the Hub fetch the configs, tokenizers and safetensors weights of the
    components model_index.json names, nothing else; what they fetch loads as a pipeline."""
    hub_side = tmp_path / "on-the-hub"
    shutil.copytree(tiny.checkpoint, hub_side, ignore=shutil.ignore_patterns("qformer_tokenizer"))
    (hub_side / "vision_encoder").mkdir()  # the real repository has folders model_index.json does not name
    (hub_side / "vision_encoder" / "model.safetensors").write_bytes(b"\0" * 1024)
    (hub_side / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\0" * 1024)
    (hub_side / "README.md").write_text("model card")
    asked: list[list[str]] = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        assert repo_id == REPO_ID and revision in (None, COMMIT)
        asked.append(list(allow_patterns))
        snapshot = tmp_path / "cache" / COMMIT
        for path in sorted(hub_side.rglob("*")):
            relative = path.relative_to(hub_side).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, snapshot / relative)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder = hub.resolve_checkpoint(REPO_ID)
    assert asked[0] == ["model_index.json"] and folder.name == COMMIT
    fetched = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in fetched and "scheduler/scheduler_config.json" in fetched
    assert not [f for f in fetched if f.startswith("vision_encoder/") or f.endswith(".bin") or f == "README.md"]
    from blipdiffusion_trt.export.exporter import load_pipeline

    assert load_pipeline(folder).unet is not None  # what was fetched is all the load reads
    # --allow-pickle also fetches the .bin weights
    shutil.rmtree(tmp_path / "cache")
    folder = hub.resolve_checkpoint(REPO_ID, allow_pickle=True)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()


def test_names_that_are_neither_folders_nor_repo_ids(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        hub.resolve_checkpoint(tmp_path / "missing" / "deeper" / "folder")
    with pytest.raises(InputError, match="--revision"):
        hub.resolve_checkpoint(tmp_path, revision="main")
    assert hub.is_repo_id("Salesforce/blipdiffusion") and hub.is_repo_id("bert-base-uncased")
    assert not hub.is_repo_id("./checkpoint") and not hub.is_repo_id("/abs/path") and not hub.is_repo_id("a/b/c")


def test_the_qformer_tokenizer_reference_is_fetched_from_the_hub(tmp_path, monkeypatch):
    """qformer/config.json's tokenizer (default bert-base-uncased, as diffusers' Q-Former loads it)
    is fetched into the cache before the load, its tokenizer files only; a folder is left alone."""
    asked: list[tuple[str, list[str]]] = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        asked.append((repo_id, list(allow_patterns)))
        return str(tmp_path / "snapshot")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = tmp_path / "checkpoint" / "qformer" / "config.json"
    config.parent.mkdir(parents=True)
    for value, expected in ((TOKENIZER_REPO_ID, TOKENIZER_REPO_ID), (None, "bert-base-uncased"),
                            (str(tmp_path), None)):
        asked.clear()
        config.write_text(json.dumps({"tokenizer": value} if value else {}))
        hub.fetch_qformer_tokenizer(config.parent.parent)
        if expected is None:
            assert asked == []
        else:
            assert [repo for repo, _ in asked] == [expected]
            assert "vocab.txt" in asked[0][1] and not [p for p in asked[0][1] if "*" in p]
    config.write_text(json.dumps({"tokenizer": "not a/repo id"}))
    with pytest.raises(CheckpointError, match="neither a folder nor a Hub repository id"):
        hub.fetch_qformer_tokenizer(config.parent.parent)
