"""Model ids resolved through the local Hugging Face cache (offline), laid out by huggingface_hub's own
functions on a random checkpoint; nothing is downloaded."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import diffusiongemma as dg


def _cache(root, repo_id, src, revision="main"):
    """Place the files of `src` in a Hugging Face cache at `root` as huggingface_hub itself does."""
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, repo_folder_name

    storage = root / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = hashlib.sha1(repo_id.encode() + revision.encode()).hexdigest()
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (storage / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(storage / "snapshots" / commit / f.name), new_blob=True)
    _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
    return commit


def test_a_model_id_loads_from_the_cache_and_a_missing_one_says_where_it_looked(tmp_path, monkeypatch):
    from huggingface_hub import constants, scan_cache_dir

    from diffusiongemma.loader.random_weights import write_random_checkpoint

    src = write_random_checkpoint(tmp_path / "src", "tiny", torch.float32)
    cache = tmp_path / "hub"
    commit = _cache(cache, "acme/tiny-dg", src)
    _cache(cache, "acme/tiny-dg", src, revision="v2")
    info = scan_cache_dir(cache)
    assert not info.warnings and [r.repo_id for r in info.repos] == ["acme/tiny-dg"]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    ck = dg.load("acme/tiny-dg")
    assert ck.path.name == commit and ck.config.text.vocab_size == 512
    assert dg.load("acme/tiny-dg", revision="v2").path.parent == ck.path.parent
    with pytest.raises(dg.CheckpointError, match=r"acme/nope is not in the local Hugging Face cache \(.*hub\)"):
        dg.load("acme/nope")
    with pytest.raises(dg.CheckpointError, match="revision 'v9' of model acme/tiny-dg is not in the local"):
        dg.load("acme/tiny-dg", revision="v9")
    with pytest.raises(dg.CheckpointError, match="model directory missing does not exist"):
        dg.load("./missing")


def test_the_command_line_honours_hf_hub_cache(tmp_path, tiny_text_model_dir):
    cache = tmp_path / "hub"
    _cache(cache, "acme/chat-dg", tiny_text_model_dir)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "diffusiongemma", "generate", "Hi", "--model", "acme/chat-dg", "--json",
                        "--max-tokens", "4", "--seed", "0"], capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["usage"]["completion_tokens"] <= 4
    r = subprocess.run([sys.executable, "-m", "diffusiongemma", "generate", "Hi", "--model", "acme/other"],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 2 and str(cache) in r.stderr and "nothing is downloaded" in r.stderr
