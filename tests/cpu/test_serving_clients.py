"""Mainstream OpenAI clients against the real Ray Serve app (tiny random model): a corpus of their payloads
(``tests/cpu/payloads/``, written from each client's defaults; some captured from the pinned clients) all get
200; output-changing fields the server lacks get a 400 naming them; the openai SDK, LangChain's ``ChatOpenAI``
and LiteLLM's ``completion(api_base=...)`` work unchanged. Plus the CLI as vLLM and TGI users type it."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

try:  # openai >= 3 ships its HTTP client as httpx2 (same API as httpx)
    import httpx2 as httpx
except ImportError:
    import httpx
from serve_app import running_app, wait_ready

from serving.errors import ServingError
from serving.openai_serving import validation_error
from serving.protocol import ChatCompletionRequest, CompletionRequest

KEY = "clients-key"
MODEL = "tiny-clients"
PAYLOADS = sorted((Path(__file__).parent / "payloads").glob("*.json"))
MSGS = [{"role": "user", "content": "hi"}]

# fields that would change the output and are not implemented: each must be a 400 naming the field
CHAT_REFUSED = [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"store": True}, "store"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"verbosity": "low"}, "verbosity"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content"),
    ({"max_tokens": "10"}, "max_tokens"),  # types stay strict
    ({"min_tokens": 50, "max_tokens": 5}, "min_tokens"),
]
COMPLETION_REFUSED = [({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"suffix": "x"}, "suffix"),
                      ({"logit_bias": {"1": 5}}, "logit_bias"), ({"top_logprobs": 2}, "top_logprobs")]


def _refused_param(cls, body: dict) -> str | None:
    from pydantic import ValidationError

    try:
        cls.model_validate(body)
    except ServingError as e:
        return e.param
    except ValidationError as e:
        return validation_error(e).param
    return None


# ----------------------------------------------------------------------------------------------- no Ray


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.stem)
def test_payload_corpus_parses(path: Path):
    case = json.loads(path.read_text())
    cls = ChatCompletionRequest if case["endpoint"] == "/v1/chat/completions" else CompletionRequest
    req = cls.model_validate({**case["body"], "model": MODEL})
    assert req.model == MODEL and case["client"] and case["source"]


@pytest.mark.parametrize(("extra", "param"), CHAT_REFUSED, ids=[p for _, p in CHAT_REFUSED])
def test_output_changing_chat_fields_are_refused_by_name(extra, param):
    assert _refused_param(ChatCompletionRequest, {"model": MODEL, "messages": MSGS, **extra}) == param


@pytest.mark.parametrize(("extra", "param"), COMPLETION_REFUSED, ids=[p for _, p in COMPLETION_REFUSED])
def test_output_changing_completion_fields_are_refused_by_name(extra, param):
    assert _refused_param(CompletionRequest, {"model": MODEL, "prompt": "x", **extra}) == param


def test_nulls_mean_defaults_and_extras_reach_sampling_params():
    req = ChatCompletionRequest.model_validate({"model": MODEL, "messages": MSGS, "temperature": None, "top_k": 7,
                                                "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2,
                                                "stop_token_ids": [3], "stream_options": {"include_usage": True}})
    p = req.sampling_params(100)
    assert (p.temperature, p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.stop_token_ids) == \
        (1.0, 7, 0.1, 1.2, 2, [3])
    assert ChatCompletionRequest.model_validate({"model": MODEL, "messages": MSGS, "top_k": -1}).sampling_params(
        10).top_k == 0


def test_cli_takes_vllm_and_tgi_flags(tiny_model: Path, tmp_path: Path):
    from serving.__main__ import load_cli_config

    cfg, _ = load_cli_config(["--model", str(tiny_model), "--port", "8123", "--host", "127.0.0.1",
                              "--served-model-name", "yes", "--max-model-len", "512", "--dtype", "half",
                              "--enforce-eager", "engine.max_num_seqs=3"])
    assert (cfg.model, cfg.port, cfg.host, cfg.served_model_name) == (str(tiny_model), 8123, "127.0.0.1", "yes")
    assert (cfg.engine.max_model_len, cfg.engine.dtype, cfg.engine.cuda_graphs, cfg.engine.max_num_seqs) == \
        (512, "float16", False, 3)
    cfg, _ = load_cli_config([str(tiny_model), "--hostname", "0.0.0.0", "--port", "8080", "port=9"])
    assert (cfg.model, cfg.host, cfg.port) == (str(tiny_model), "0.0.0.0", 8080)  # a flag wins over an override
    cfg, _ = load_cli_config(["--model-id", str(tiny_model)])
    assert cfg.model == str(tiny_model) and cfg.port == 8000
    with pytest.raises(SystemExit):
        load_cli_config(["--model", str(tiny_model), "--tensor-parallel-size", "2"])


# ----------------------------------------------------------------------------------------------- the real app


@pytest.fixture(scope="module")
def base(tiny_model: Path):
    pytest.importorskip("ray")
    with running_app(tiny_model, [f"served_model_name={MODEL}", "engine.max_model_len=256",
                                  "engine.max_num_seqs=4"], {"API_KEYS": KEY}) as url:
        wait_ready(url)
        yield url


def _post(base: str, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(base + endpoint, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_every_corpus_payload_gets_200(base: str):
    for path in PAYLOADS:
        case = json.loads(path.read_text())
        body = {**case["body"], "model": MODEL}
        if body.get("stream"):
            with httpx.stream("POST", base + case["endpoint"], json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200, (path.name, r.read())
                events = [line[6:] for line in r.iter_lines() if line]
            assert events[-1] == "[DONE]", path.name
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks and not any("error" in c for c in chunks), (path.name, chunks)
            assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in chunks), path.name
            if (body.get("stream_options") or {}).get("include_usage"):
                assert chunks[-1]["usage"]["completion_tokens"] > 0, path.name
        else:
            r = _post(base, case["endpoint"], body)
            assert r.status_code == 200, (path.name, r.text)
            assert r.json()["choices"][0]["finish_reason"] in ("stop", "length"), path.name


def test_output_changing_fields_get_400_naming_them(base: str):
    for extra, param in CHAT_REFUSED:
        r = _post(base, "/v1/chat/completions", {"model": MODEL, "messages": MSGS, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
    for extra, param in COMPLETION_REFUSED:
        r = _post(base, "/v1/completions", {"model": MODEL, "prompt": "x", **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (param, r.text)
    r = _post(base, "/v1/completions", {"model": MODEL, "prompt": "x", "stop_token_ids": [10**6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids"


def test_openai_sdk_with_vllm_extras(base: str):
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)
    extras = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 4}
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0.8, seed=1,
                                       store=False, metadata={"a": "b"}, service_tier="auto", extra_body=extras)
    assert r.usage.completion_tokens >= 4 and r.choices[0].finish_reason in ("stop", "length")
    again = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, temperature=0.8, seed=1,
                                           extra_body=extras)
    assert again.choices[0].message.content == r.choices[0].message.content  # the no-op fields change nothing
    plain = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0)
    penalized = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, temperature=0,
                                               extra_body={"repetition_penalty": 2.0})
    assert penalized.choices[0].message.content != plain.choices[0].message.content  # it reaches the sampler


def test_langchain_chat_openai(base: str):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key=KEY, max_tokens=5,
                                      temperature=0, max_retries=0, stream_usage=True)
    msg = llm.invoke([("system", "Be brief."), ("human", "Hello"), ("ai", "Hi."), ("human", "Bye")])
    assert isinstance(msg.content, str) and msg.usage_metadata["output_tokens"] <= 5
    chunks = list(llm.stream("Hello"))
    assert "".join(c.content for c in chunks) == llm.invoke("Hello").content
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) > 0
    assert len(llm.batch(["a", "b"])) == 2


def test_litellm_completion(base: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here: its bundled price table
    litellm = pytest.importorskip("litellm")
    kw = dict(model=f"openai/{MODEL}", api_base=base + "/v1", api_key=KEY, messages=MSGS, max_tokens=5,
              temperature=0, num_retries=0)
    r = litellm.completion(**kw)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 5
    streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **kw)
                       if c.choices)
    assert streamed == r.choices[0].message.content
    r = litellm.completion(**{**kw, "model": f"hosted_vllm/{MODEL}"}, top_k=3, repetition_penalty=1.1)
    assert r.choices[0].finish_reason in ("stop", "length")
