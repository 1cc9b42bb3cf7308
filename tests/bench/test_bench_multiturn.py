"""The multi-turn chat workload (each turn resends the conversation so far), fresh prompts per sweep probe, token-id
prompts (--tokenize-prompt) and the cached prompt tokens a server reports."""
import asyncio
import json

from bench_fake_server import Behaviour, FakeOpenAIServer, Script
from typer.testing import CliRunner

from sloserve.bench.arrivals import Arrivals
from sloserve.bench.client import ClientConfig
from sloserve.bench.lengths import LengthDist
from sloserve.bench.multiturn import MultiTurnSource
from sloserve.bench.records import RequestRecord
from sloserve.bench.runner import play
from sloserve.bench.sharegpt import bundled_path
from sloserve.bench.synthetic import SyntheticSource
from sloserve.bench.tokens import HFTokenizer
from sloserve.bench.workload import Workload, WorkloadOptions
from sloserve.cli import app


def bundled_exchanges() -> dict[str, str]:
    with open(bundled_path("sharegpt_sample.json"), encoding="utf-8") as f:
        return {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in json.load(f)}


def test_each_turn_resends_the_conversation_so_far_with_the_recorded_replies():
    specs = Workload(MultiTurnSource(turns=3), Arrivals("poisson", 2.0), 7, seed=1).requests()
    replies = bundled_exchanges()
    assert [len(s.messages) for s in specs] == [1, 3, 5, 1, 3, 5, 1]  # a new conversation every 3 turns
    for prev, spec in zip(specs, specs[1:]):
        if len(spec.messages) == 1:
            continue
        assert spec.messages[:-2] == prev.messages
        assert spec.messages[-2] == {"role": "assistant", "content": replies[prev.messages[-1]["content"]]}
        assert spec.prompt.startswith(prev.prompt)  # the completions text is a prefix too (what a cache reuses)
        assert spec.prompt_len > prev.prompt_len
    users = [s.messages[-1]["content"] for s in specs]
    assert len(set(users)) == 7 and set(users) <= set(replies)
    assert specs[0].output_len == -(-len(replies[users[0]]) // 4)  # the recorded reply's length (chars / 4)


def test_chat_endpoints_get_the_messages_and_completions_the_rendered_text():
    spec = Workload(MultiTurnSource(turns=2, output_len=9), num_requests=2).requests()[1]
    chat = ClientConfig(endpoint="/v1/chat/completions").payload(spec)
    assert chat["messages"] == spec.messages and [m["role"] for m in chat["messages"]] == ["user", "assistant", "user"]
    assert chat["max_completion_tokens"] == 9
    text = ClientConfig().payload(spec)
    assert text["prompt"] == spec.prompt and text["prompt"].endswith("\nAssistant:")
    w = WorkloadOptions(dataset_name="multiturn", multiturn_turns=2, sharegpt_output_len=9, num_prompts=2).build()
    assert Workload.from_dict(json.loads(json.dumps(w.to_dict()))).requests() == w.requests()


def test_a_new_draw_changes_the_prompts_but_not_the_shared_prefix_or_the_gaps():
    w = Workload(SyntheticSource(LengthDist(12), LengthDist(4), prefix_len=5), Arrivals("poisson", 3.0), 20, seed=2)
    first, second = w.requests(), w.with_draw(1).requests()
    assert w.with_draw(0).requests() == first
    assert [s.arrival_s for s in second] == [s.arrival_s for s in first]
    assert all(a.prompt[:5] == b.prompt[:5] == first[0].prompt[:5] for a, b in zip(first, second))
    assert not {tuple(s.prompt[5:]) for s in first} & {tuple(s.prompt[5:]) for s in second}
    assert Workload.from_dict(w.with_draw(3).to_dict()).draw == 3


def test_sweep_probes_send_fresh_prompts_and_say_so(tmp_path):
    out = tmp_path / "sweep"
    args = ["bench", "--num-prompts", "4", "--random-input-len", "6", "--random-output-len", "6",
            "--random-prefix-len", "3", "--slo", "ttft=5s", "--sweep", "--sweep-max-probes", "2",
            "--request-rate", "20", "--result-dir", str(out), "--no-plots", "--disable-tqdm"]
    with FakeOpenAIServer(Script(Behaviour(ttft_s=0.01, gap_s=0.005))) as srv:
        res = CliRunner().invoke(app, args + ["--base-url", srv.base_url])
        bodies = [b for b in srv.bodies() if b["max_tokens"] == 6]  # not each probe's untimed test request (4)
    assert res.exit_code == 0, res.output
    assert "Prompts: fresh per probe" in res.output
    prompts = [tuple(b["prompt"]) for b in bodies]
    assert len(prompts) == 8 and len(set(prompts)) == 8  # two probes of four, none resent
    assert len({p[:3] for p in prompts}) == 1  # the prefix the workload asks for stays shared
    assert json.loads((out / "results.json").read_text())["sweep"]["prompts"] == "fresh per probe"


def save_word_tokenizer(path) -> HFTokenizer:
    """One id per word of the bundled conversations (and the "User:"/"Assistant:" labels), [UNK] = 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for q, a in bundled_exchanges().items() for w in (q + " " + a).split()} | {"User:", "Assistant:"})
    tok = Tokenizer(models.WordLevel({"[UNK]": 0} | {w: i + 1 for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(path))
    return HFTokenizer(str(path))


def test_tokenize_prompt_sends_the_tokenizers_ids_of_each_turn(tmp_path):
    tok = save_word_tokenizer(tmp_path / "tok")
    text = Workload(MultiTurnSource(turns=3, output_len=5), num_requests=4, seed=3).requests(tok)
    ids = Workload(MultiTurnSource(turns=3, output_len=5), num_requests=4, seed=3, tokenize_prompt=True).requests(tok)
    assert [s.prompt for s in ids] == [tok.encode(s.prompt) for s in text]
    assert [s.prompt_len for s in ids] == [len(s.prompt) for s in ids] and 0 not in ids[1].prompt
    assert ids[1].prompt[:len(ids[0].prompt)] == ids[0].prompt  # turn 2 extends turn 1's ids (a cache can hit)
    out = tmp_path / "run"
    args = ["bench", "--dataset-name", "multiturn", "--multiturn-turns", "3", "--num-prompts", "4",
            "--sharegpt-output-len", "5", "--seed", "3", "--tokenizer", str(tmp_path / "tok"), "--tokenize-prompt",
            "--num-warmups", "1", "--result-dir", str(out), "--no-plots", "--disable-tqdm", "--model", "m"]
    with FakeOpenAIServer(Script(Behaviour(ttft_s=0.01, gap_s=0.005))) as srv:
        res = CliRunner().invoke(app, args + ["--base-url", srv.base_url])
        bodies = srv.bodies()
    assert res.exit_code == 0, res.output
    assert all(isinstance(b["prompt"], list) and all(isinstance(t, int) for t in b["prompt"]) for b in bodies)
    assert [b["prompt"] for b in bodies[-4:]] == [s.prompt for s in ids]  # after the test request and the warm-up
    assert json.loads((out / "results.json").read_text())["config"]["workload"]["tokenize_prompt"] is True
    for extra, message in ((["--tokenizer", str(tmp_path / "tok"), "--endpoint", "/v1/chat/completions"], "completions"),
                           ([], "needs --tokenizer")):
        res = CliRunner().invoke(app, ["bench", "--tokenize-prompt", "--model", "m", "--result-dir", str(out), *extra])
        assert res.exit_code == 2 and message in res.output, res.output


def test_the_cached_prompt_tokens_a_server_reports_in_usage_are_recorded():
    w = Workload(SyntheticSource(LengthDist(12), LengthDist(3)), Arrivals(), 2)
    with FakeOpenAIServer(Script(Behaviour(ttft_s=0.01, gap_s=0.005, cached_tokens=7))) as srv:
        run = asyncio.run(play(w, ClientConfig(srv.base_url, model="m")))
    with FakeOpenAIServer(Script(Behaviour(ttft_s=0.01, gap_s=0.005))) as srv:
        without = asyncio.run(play(w, ClientConfig(srv.base_url, model="m")))
    assert [(r.prompt_tokens, r.cached_tokens) for r in run.records] == [(12, 7), (12, 7)]
    assert [r.cached_tokens for r in without.records] == [None, None]
    assert RequestRecord.from_dict(run.records[0].to_dict()).cached_tokens == 7
