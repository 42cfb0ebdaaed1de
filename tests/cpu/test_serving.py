"""The OpenAI-compatible API: a real Ray Serve app on localhost, a tiny random Llama, the official ``openai`` client.

One app for the whole module (module-scoped fixture); API keys are on, so every client passes one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest

try:  # openai >= 3 ships its HTTP client as httpx2 (same API as httpx)
    import httpx2 as httpx
except ImportError:
    import httpx
from prometheus_client.parser import text_string_to_metric_families
from serve_app import running_app, wait_ready

KEY = "test-key-123"
MODEL = "tiny-chat"
SLOTS, WAITING = 8, 12


@pytest.fixture(scope="module")
def server(tiny_model: Path):
    pytest.importorskip("ray")
    overrides = [f"served_model_name={MODEL}", "engine.max_model_len=256", f"engine.max_num_seqs={SLOTS}",
                 f"engine.max_waiting={WAITING}", "deployment.max_ongoing_requests=64",
                 "deployment.health_check_period_s=2"]
    # 50 ms per decode step: a 200-token stream lasts 10 s, longer than sending all of the queue test's requests
    # and hanging up on them takes on a loaded 2-core box, so that test sees exactly its 429s and aborts, never a
    # stream that finished first (the replicas inherit this)
    with running_app(tiny_model, overrides, {"API_KEYS": f"other-key,{KEY}"},
                     test_env={"SERVING_TEST_STEP_DELAY_S": "0.05"}) as base:
        early = httpx.get(f"{base}/ready", timeout=10)  # the replica is up, the model still loading
        early_chat = httpx.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
        health = httpx.get(f"{base}/health", timeout=10)
        wait_ready(base)
        yield {"base": base, "early": early, "early_chat": early_chat, "health": health}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client: openai.OpenAI, text: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


def _metrics(base: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _metric(m: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in m.items() if n == name and all(dict(lab).get(k) == v2 for k, v2 in labels.items()))


def test_probes_503_until_ready(server):
    assert server["health"].status_code == 200
    assert server["early"].status_code == 503
    assert server["early"].json()["error"]["code"] == "not_ready"
    assert server["early_chat"].status_code == 503
    assert server["early_chat"].headers["retry-after"] == server["early"].headers["retry-after"] == "5"
    ready = httpx.get(server["base"] + "/ready").json()
    assert ready["status"] == "ready" and ready["slots"] == SLOTS


def test_models_and_api_keys(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server["base"] + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server["base"] + "/metrics").status_code == 200  # probes and metrics need no key


def test_chat_non_stream_shape_and_usage(client):
    r = _chat(client, "Hello, how are you?", max_tokens=5, temperature=0, user="u1")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.created > 0 and r.model == MODEL
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    r2 = _chat(client, "Hello, how are you?", max_completion_tokens=5, temperature=0)
    assert r2.choices[0].message.content == r.choices[0].message.content  # greedy is deterministic


def test_stream_matches_non_stream_with_usage(client):
    ref = _chat(client, "What is two plus two?", max_tokens=8, temperature=0)
    chunks = list(_chat(client, "What is two plus two?", max_tokens=8, temperature=0, stream=True,
                        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_framing_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server["base"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_seed_and_logprobs(client):
    r = _chat(client, "Write a poem", max_tokens=6, temperature=1.0, n=3, seed=11, logprobs=True, top_logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices) == 18
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for c in r.choices for t in c.logprobs.content)
    again = _chat(client, "Write a poem", max_tokens=6, temperature=1.0, n=3, seed=11)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert len({c.message.content for c in r.choices}) > 1  # per-choice seeds differ


def test_stop_string_and_list(client):
    full = _chat(client, "The capital of France", max_tokens=12, temperature=0).choices[0].message.content
    stop = full[4:7]
    assert stop.strip()
    for s in (stop, [stop, "never-appears"]):
        r = _chat(client, "The capital of France", max_tokens=12, temperature=0, stop=s)
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].message.content == full[:full.find(stop)]


def test_ignore_eos_extension_runs_to_max_tokens(client):
    kw = dict(max_tokens=160, n=8, temperature=2.0, seed=3)  # hot sampling over a 400-token vocabulary meets EOS
    plain = _chat(client, "Tell me everything", **kw)
    assert "stop" in {c.finish_reason for c in plain.choices}, "precondition: some choice samples end-of-sequence"
    forced = _chat(client, "Tell me everything", extra_body={"ignore_eos": True}, **kw)
    assert {c.finish_reason for c in forced.choices} == {"length"}
    assert forced.usage.completion_tokens == 8 * 160
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        _chat(client, "x", extra_body={"ignore_eos": "sometimes"})


def test_multi_turn(client):
    one = _chat(client, "And Japan?", max_tokens=4, temperature=0)
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Japan?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens > one.usage.prompt_tokens + 10
    assert r.choices[0].finish_reason in ("stop", "length")


def test_completions_endpoint(client):
    r = client.completions.create(model=MODEL, prompt="Two plus two is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Two plus two is", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert text == r.choices[0].text


def test_error_statuses(server, client):
    base, auth = server["base"], {"Authorization": f"Bearer {KEY}"}

    def post(body: dict | str) -> httpx.Response:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        return httpx.post(f"{base}/v1/chat/completions", headers=auth, timeout=60, **kw)

    msgs = [{"role": "user", "content": "hi"}]
    r = post({"model": MODEL, "messages": msgs, "functions": [{"name": "f"}]})  # the deprecated form of tools
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions"
    r = post({"model": MODEL, "messages": msgs, "made_up_field": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "made_up_field"
    r = post({"model": MODEL, "messages": msgs, "temperature": 7})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert post("{not json").status_code == 400
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, "hi", max_tokens=10_000)
    assert "maximum context length" in str(e.value)
    # one bad request never harms the others
    assert _chat(client, "hi", max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_16_concurrent_streams_are_correct(client, server):
    prompts = [f"Request number {i}: write about the sea" for i in range(16)]
    refs = [_chat(client, p, max_tokens=8, temperature=0).choices[0].message.content for p in prompts]
    aclient = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(p: str) -> str:
        stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}],
                                                       max_tokens=8, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def run() -> list[str]:
        return await asyncio.gather(*(one(p) for p in prompts))

    got = asyncio.run(run())
    assert got == refs
    assert len(set(got)) > 1


def test_queue_full_429_and_disconnect_frees_capacity(server):
    base, auth = server["base"], {"Authorization": f"Bearer {KEY}"}
    before = _metrics(base)
    n = SLOTS + WAITING + 8
    # ignore_eos: a sampled end-of-sequence would end a stream early and let one more request in
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long story"}], "max_tokens": 200,
            "stream": True, "ignore_eos": True}

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            reqs = [c.build_request("POST", f"{base}/v1/chat/completions", json=body, headers=auth) for _ in range(n)]
            resps = await asyncio.gather(*(c.send(r, stream=True) for r in reqs))
            codes = [r.status_code for r in resps]
            assert {r.headers.get("retry-after") for r in resps if r.status_code == 429} == {"1"}, codes
            for r in resps:  # read one event of each admitted stream, then hang up
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if line:
                            break
                await r.aclose()
            return codes

    t = time.monotonic()
    codes = asyncio.run(run())
    assert codes.count(429) >= n - SLOTS - WAITING and set(codes) <= {200, 429}
    assert time.monotonic() - t < 60
    deadline = time.monotonic() + 30
    while True:
        stats = httpx.get(f"{base}/ready").json()
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["free_blocks"] == stats["total_blocks"]:
            break
        assert time.monotonic() < deadline, f"disconnected streams still hold capacity: {stats}"
        time.sleep(0.2)
    # the engine frees a slot just before it counts the abort: give the counter the same deadline
    while True:
        after = _metrics(base)
        aborts = _metric(after, "vllm:request_success_total", finished_reason="abort") - \
            _metric(before, "vllm:request_success_total", finished_reason="abort")
        if aborts == codes.count(200) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert aborts == codes.count(200)
    assert _metric(after, "vllm:request_errors_total", status_code="429") - \
        _metric(before, "vllm:request_errors_total", status_code="429") == codes.count(429)


def test_metrics_count_what_was_sent(server, client):
    before = _metrics(server["base"])
    r = _chat(client, "Count me", max_tokens=7, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    after = _metrics(server["base"])

    def delta(name: str, **lab) -> float:
        return _metric(after, name, **lab) - _metric(before, name, **lab)

    assert delta("vllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("vllm:generation_tokens_total") == 7
    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:request_errors_total", status_code="404") == 1
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 6
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert delta("vllm:request_queue_time_seconds_count") == 1
    assert _metric(after, "vllm:num_requests_running") == 0
    assert ("vllm:kv_cache_usage_perc", (("model_name", MODEL),)) in after
    assert ("vllm:prefix_cache_queries_total", (("model_name", MODEL),)) in after
    assert delta("vllm:prefix_cache_queries_total") == r.usage.prompt_tokens
    ready = httpx.get(f"{server['base']}/ready").json()
    assert ready["memory_mib"]["kv_tokens"] == ready["total_blocks"] * ready["memory_mib"]["block_size"]
