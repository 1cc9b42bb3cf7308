"""The calls a vLLM user writes, offline (LLM) and over HTTP (official `openai` client), and the shapes they expect."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from serverkit import MODEL_NAME

import sloserve
from sloserve import LLM, CompletionOutput, RequestOutput, SamplingParams, TextPrompt, TokensPrompt
from sloserve.engine.detokenizer import make_detokenizer

PROMPTS = ["The quick brown fox", "Latency is what a user feels"]


@pytest.fixture(scope="module")
def llm(chat_model_dir):
    # The same dummy weights (seed 0) as the shared test server's, so outputs can be compared.
    return LLM(model=str(chat_model_dir), load_format="dummy", num_kv_blocks=128)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


# -- offline ---------------------------------------------------------------------------------------
def test_generate_returns_vllm_request_outputs(llm):
    outs = llm.generate(PROMPTS, GREEDY)
    tokenizer = llm.get_tokenizer()
    for prompt, out in zip(PROMPTS, outs):
        assert isinstance(out, RequestOutput) and isinstance(out.outputs[0], CompletionOutput)
        assert out.prompt == prompt and out.prompt_token_ids == tokenizer.encode(prompt)
        completion = out.outputs[0]
        assert len(completion.token_ids) == 10 and completion.finish_reason == "length" and completion.stop_reason is None
        # The streamed detokenization (DecodeStream) equals decoding the whole output at once.
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert len(completion.token_times) == 10 and out.finished


def test_prompt_forms_agree(llm):
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    by_text = llm.generate(PROMPTS, GREEDY)
    by_dicts = llm.generate([TokensPrompt(prompt_token_ids=ids[0]), TextPrompt(prompt=PROMPTS[1])], GREEDY)
    single = llm.generate({"prompt_token_ids": ids[0]}, GREEDY)
    assert [o.outputs[0].token_ids for o in by_dicts] == [o.outputs[0].token_ids for o in by_text]
    assert single[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
    assert by_dicts[0].prompt is None and by_dicts[1].prompt == PROMPTS[1]
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": "x", "multi_modal_data": {}}, GREEDY)


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "Shall I compare thee?"}]
    out = llm.chat(messages, GREEDY)[0]
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt == text and out.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    direct = llm.generate({"prompt_token_ids": out.prompt_token_ids}, GREEDY)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
    assert len(llm.chat([messages, messages], GREEDY)) == 2


def test_stop_string_kept_with_include_stop_str_in_output(llm):
    text = llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].text
    stop = text[3:5]
    assert stop.strip(), "the dummy model's text should have a visible stop candidate"
    cut = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=10, stop=[stop]))[0].outputs[0]
    kept = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=10, stop=[stop],
                                                    include_stop_str_in_output=True))[0].outputs[0]
    i = text.index(stop)
    assert (cut.text, cut.stop_reason) == (text[:i], stop)
    assert kept.text == text[: i + len(stop)] and kept.finish_reason == "stop"


def test_skip_special_tokens_decides_whether_special_tokens_show(llm):
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.encode(PROMPTS[0])
    words = tokenizer.encode(" fox")
    for skip, expected in [(True, " fox"), (False, " fox<|endoftext|>")]:
        detokenizer = make_detokenizer(tokenizer, prompt, skip_special_tokens=skip)
        assert "".join(detokenizer.add(t) for t in [*words, tokenizer.eos_token_id]) == expected


def test_stop_token_text_is_not_in_the_output(llm):
    prompt = llm.get_tokenizer().encode(PROMPTS[0])
    first = llm.generate({"prompt_token_ids": prompt}, GREEDY)[0].outputs[0].token_ids[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=3, stop_token_ids=[first]))
    completion = out[0].outputs[0]
    assert (completion.token_ids, completion.text, completion.stop_reason) == ([first], "", first)


# -- over HTTP ----------------------------------------------------------------------------------------
def test_vllm_sampling_fields_are_honoured_over_http(llm, client):
    extra = {"repetition_penalty": 1.6, "min_tokens": 4, "min_p": 0.2, "top_k": 5, "ignore_eos": True}
    # 16 tokens: the dummy model's greedy output starts repeating itself by then, so the penalties bite.
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                    presence_penalty=1.5, frequency_penalty=0.7, extra_body=extra)
    params = SamplingParams(max_tokens=16, temperature=0, presence_penalty=1.5, frequency_penalty=0.7,
                            repetition_penalty=1.6, min_tokens=4, min_p=0.2, top_k=5, ignore_eos=True)
    offline = llm.generate(PROMPTS[:1], params)[0].outputs[0]
    plain = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0]
    assert out.choices[0].text == offline.text != plain.text


def test_stop_token_ids_end_the_http_completion(llm, client):
    ids = llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                    extra_body={"stop_token_ids": [ids[2]], "ignore_eos": True, "return_token_ids": True})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == 3


@pytest.mark.parametrize("field, value", [("use_beam_search", True), ("guided_json", {"type": "object"}),
                                          ("bad_words", ["fox"]), ("truncate_prompt_tokens", 4)])
def test_unsupported_vllm_fields_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, extra_body={field: value})
    assert field in caught.value.message and caught.value.body["param"] == field


def test_vllm_fields_at_their_defaults_pass(client):
    out = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_body={"use_beam_search": False, "add_generation_prompt": True, "skip_special_tokens": True},
    )
    assert out.choices[0].message.role == "assistant"


def test_out_of_range_penalty_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, presence_penalty=3.0)


# -- vLLM's extra endpoints ---------------------------------------------------------------------------
def test_tokenize_and_detokenize_round_trip(server, llm):
    tokenizer = llm.get_tokenizer()
    r = httpx.post(server.url + "/tokenize", json={"model": MODEL_NAME, "prompt": PROMPTS[0]})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tokenizer.encode(PROMPTS[0]) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256
    back = httpx.post(server.url + "/detokenize", json={"model": MODEL_NAME, "tokens": body["tokens"]})
    assert back.json() == {"prompt": tokenizer.decode(body["tokens"])}
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404


def test_version_and_ping(server):
    assert httpx.get(server.url + "/version").json() == {"version": sloserve.__version__}
    assert httpx.get(server.url + "/ping").status_code == 200
    assert httpx.post(server.url + "/ping", json={}).status_code == 200


def test_without_a_tokenizer_token_ids_stream(tiny_model_dir, start_server):
    server = start_server(tiny_model_dir("llama"), served_model_names=["bare"])
    body = {"model": "bare", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "stream": True}
    lines = [line for line in httpx.post(server.url + "/v1/completions", json=body, timeout=30).text.splitlines()
             if line.startswith("data: {")]
    ids = [t for line in lines for c in json.loads(line[6:])["choices"] for t in c.get("token_ids") or []]
    assert len(ids) == 4
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 400


def test_bench_counts_token_arrivals_from_a_server_without_tokenizer(tiny_model_dir, start_server):
    import asyncio

    from sloserve.bench.client import ClientConfig, send
    from sloserve.bench.workload import RequestSpec

    server = start_server(tiny_model_dir("llama"), served_model_names=["bare"])
    cfg = ClientConfig(server.url, "/v1/completions", "bare", ignore_eos=True)

    async def one():
        async with httpx.AsyncClient(base_url=server.url) as http:
            return await send(http, cfg, RequestSpec(0, [5, 6, 7], 3, 6, 0.0), 0.0)

    rec = asyncio.run(one())
    assert rec.error_kind is None and rec.success
    # Every token is counted from the ids the chunks carry (no text to count); a server may pack two steps'
    # tokens into one chunk when the client reads slower than the engine steps, so count tokens, not chunks.
    assert rec.output_tokens == 6 and sum(rec.chunk_tokens) == 6
    assert len(rec.token_times_s) == len(rec.chunk_tokens) >= 1


@pytest.mark.parametrize("field, value", [("add_special_tokens", False), ("add_generation_prompt", False),
                                          ("continue_final_message", True)])
def test_template_controls_other_than_the_defaults_are_refused(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={field: value})
    assert caught.value.body["param"] == field
