"""`n > 1` over HTTP: n choices (streamed with their index), usage of all of them, one prefill, abort of all."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from serverkit import MODEL_NAME, metric, wait_until


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def all_blocks_back(engine) -> bool:
    blocks = engine.block_manager
    return blocks.num_free_blocks == blocks.num_blocks and not engine.has_unfinished_requests()


def test_greedy_n3_gives_three_equal_choices_and_counts_every_token(server, client):
    prompt = list(range(200, 240))  # 40 tokens: two full blocks of 16 that the siblings reuse
    before = server.engine.block_manager.stats.hits
    out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=7, temperature=0, n=3,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    ids = [c.model_extra["token_ids"] for c in out.choices]
    assert ids[0] == ids[1] == ids[2] and len(ids[0]) == 7
    alone = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=7, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    assert alone.choices[0].model_extra["token_ids"] == ids[0]
    assert out.usage.completion_tokens == 21 and out.usage.prompt_tokens == 40
    # The leader computed the prompt; the two siblings (and then the single request) found its 32 cached tokens.
    assert server.engine.block_manager.stats.hits - before == 3 * 32
    assert wait_until(lambda: all_blocks_back(server.engine))


def test_seeded_choices_are_reproducible_per_index_and_equal_seed_plus_index_alone(client):
    kwargs = dict(model=MODEL_NAME, prompt="Shall I compare thee", max_tokens=12, temperature=1.0,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    first = client.completions.create(n=3, seed=50, **kwargs)
    again = client.completions.create(n=3, seed=50, **kwargs)
    tokens = [c.model_extra["token_ids"] for c in first.choices]
    assert tokens == [c.model_extra["token_ids"] for c in again.choices]
    assert len({tuple(t) for t in tokens}) == 3
    for i in range(3):
        alone = client.completions.create(n=1, seed=50 + i, **kwargs)
        assert alone.choices[0].model_extra["token_ids"] == tokens[i]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streamed_choices_carry_their_index_and_equal_the_unstreamed_ones(client, chat):
    common = dict(model=MODEL_NAME, temperature=0.8, seed=9, n=3, extra_body={"ignore_eos": True})
    if chat:
        create = client.chat.completions.create
        kwargs = common | dict(messages=[{"role": "user", "content": "Compare thee"}], max_completion_tokens=10)
    else:
        create = client.completions.create
        kwargs = common | dict(prompt="Compare thee", max_tokens=10)
    full = create(**kwargs)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, finishes = ["", "", ""], [[], [], []]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += (choice.delta.content or "") if chat else choice.text
            if choice.finish_reason is not None:
                finishes[choice.index].append(choice.finish_reason)
    want = [c.message.content for c in full.choices] if chat else [c.text for c in full.choices]
    assert texts == want
    assert finishes == [["length"]] * 3  # each choice ends exactly once
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 30
    if chat:
        assert [c.index for c in chunks[0].choices] == [0, 1, 2]  # the role opens every choice


def test_abort_mid_stream_ends_every_sibling_and_frees_their_blocks(chat_model_dir, start_server):
    server = start_server(chat_model_dir, step_delay_s=0.02)
    body = {"model": MODEL_NAME, "prompt": list(range(100, 150)), "max_tokens": 150, "n": 4, "stream": True,
            "ignore_eos": True}
    seen = set()
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.update(c["index"] for c in json.loads(line[6:])["choices"])
            if len(seen) == 4:
                break  # leave with every sibling mid-generation
    assert seen == {0, 1, 2, 3}
    assert wait_until(lambda: all_blocks_back(server.engine))
    assert server.engine.requests == {}
    assert wait_until(lambda: metric(server.metrics(), "sloserve:request_success_total", finished_reason="abort") == 1)


def test_best_of_equal_to_n_is_honoured_and_other_values_refused(client, server):
    out = client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, n=2, best_of=2)
    assert len(out.choices) == 2
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "n": 2, "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
