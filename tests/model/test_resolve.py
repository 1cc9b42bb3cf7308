"""Model resolution as vLLM does it: a directory, or a hub id from the local HF cache; offline it says why it cannot."""
import json
import shutil

import pytest
from huggingface_hub import constants

from sloserve import LLM, SamplingParams
from sloserve.model.resolve import resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir):
    """A cache laid out as huggingface_hub writes it: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_model_dir("llama"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return tmp_path / "hub"


def test_a_hub_id_resolves_from_the_cache_offline(hub_cache, offline, tiny_model_dir):
    assert resolve_model_dir("acme/tiny-llama", download_dir=str(hub_cache)) == hub_cache / "models--acme--tiny-llama" / "snapshots" / COMMIT
    assert resolve_model_dir("acme/tiny-llama", revision=COMMIT, download_dir=str(hub_cache)).name == COMMIT
    llm = LLM("acme/tiny-llama", download_dir=str(hub_cache), dtype="float32")
    local = LLM(str(tiny_model_dir("llama")), dtype="float32")
    params = SamplingParams(max_tokens=5, temperature=0)
    prompt = {"prompt_token_ids": [5, 9, 22]}
    assert llm.generate(prompt, params)[0].outputs[0].token_ids == local.generate(prompt, params)[0].outputs[0].token_ids


def test_a_missing_hub_id_offline_says_so(hub_cache, offline):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as caught:
        resolve_model_dir("acme/not-there", download_dir=str(hub_cache))
    assert str(hub_cache) in str(caught.value)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model_dir("acme/tiny-llama", revision="v2", download_dir=str(hub_cache))  # no such ref cached


def test_local_paths_never_go_to_the_hub(tmp_path, offline):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model directory"):
        resolve_model_dir(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_custom_code_is_refused_clearly(tmp_path, tiny_model_dir):
    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config |= {"model_type": "acme_lm", "auto_map": {"AutoModelForCausalLM": "modeling_acme.AcmeForCausalLM"}}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="never runs"):
        LLM(str(model))
