"""Bad input raises a clear error naming the problem."""
import pytest

from sloserve import LLM, SamplingParams
from sloserve.config import EngineConfig


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama")), dtype="float32")


def test_prompt_longer_than_the_model_allows(llm):
    with pytest.raises(ValueError, match="300 tokens.*maximum length is 256"):
        llm.generate(prompt_token_ids=[[5] * 300])


def test_empty_prompt(llm):
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate(prompt_token_ids=[[]])


def test_token_ids_outside_the_vocabulary(llm):
    with pytest.raises(ValueError, match=r"\[0, 384\)"):
        llm.generate(prompt_token_ids=[[5, 384]])


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_must_be_positive(max_tokens):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=max_tokens)


@pytest.mark.parametrize("top_p", [0.0, 1.5, -0.1])
def test_top_p_outside_unit_interval(top_p):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=top_p)


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        EngineConfig(model="x", dtype="float8")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLM(str(tmp_path))


def test_request_that_can_never_fit_the_kv_cache(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4, num_kv_blocks=8)
    with pytest.raises(ValueError, match="needs 10 KV blocks but the cache holds 8"):
        llm.generate(prompt_token_ids=[[5] * 30], sampling_params=SamplingParams(max_tokens=10))
    assert llm.engine.block_manager.num_free_blocks == 8


def test_a_failed_batch_leaves_no_request_behind(llm):
    with pytest.raises(ValueError):
        llm.generate(prompt_token_ids=[[5, 6], []])
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_used_blocks == 0
