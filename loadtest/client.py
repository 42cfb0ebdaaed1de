"""One request to an OpenAI-compatible endpoint, streamed or not, timed per SSE chunk over aiohttp."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp

Endpoint = Literal["chat", "completions"]


@dataclass
class Prompt:
    """What one request sends: chat messages or a completion prompt, and how many tokens to ask for."""

    text: str
    max_tokens: int
    messages: list[dict[str, str]] | None = None
    input_tokens: int | None = None  # known length (synthetic prompts with a tokenizer), else None


@dataclass
class RequestResult:
    """Timings and counts of one request; times in seconds, ``start`` on the ``time.perf_counter`` clock."""

    ok: bool
    start: float
    end: float = 0.0
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each content chunk (relative to start)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    token_source: Literal["usage", "chunks", "none"] = "none"
    status: int | None = None
    error: str | None = None  # error kind: "http_500", "connect_error", "timeout", "stream_error", ...
    error_detail: str | None = None
    finish_reason: str | None = None
    output_chars: int = 0

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (tokens - 1)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency"] = self.latency
        d["tpot"] = self.tpot
        return d


def api_base(url: str) -> str:
    """``http://h:8000`` or ``http://h:8000/v1`` (or ``.../v1/chat/completions``) -> ``http://h:8000/v1``."""
    u = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if u.endswith(suffix):
            u = u[: -len(suffix)]
    return u if u.endswith("/v1") else u + "/v1"


def build_body(model: str, prompt: Prompt, endpoint: Endpoint, stream: bool, ignore_eos: bool,
               temperature: float, extra: dict[str, Any] | None, stream_usage: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": prompt.max_tokens, "temperature": temperature,
                            "stream": stream}
    if endpoint == "chat":
        body["messages"] = prompt.messages or [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if stream and stream_usage:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:  # vLLM's extension (sampling parameter ignore_eos): output length = max_tokens
        body["ignore_eos"] = True
    if extra:
        body.update(extra)
    return body


def _delta_text(choice: dict[str, Any], endpoint: Endpoint) -> str:
    if endpoint == "chat":
        delta = choice.get("delta") or choice.get("message") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


def _error_detail(payload: str) -> str:
    try:
        err = json.loads(payload).get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))[:300]
        if err:
            return str(err)[:300]
    except (ValueError, AttributeError):
        pass
    return payload[:300]


async def send_request(session: aiohttp.ClientSession, base: str, body: dict[str, Any], endpoint: Endpoint,
                       headers: dict[str, str], timeout: float) -> RequestResult:
    """Send one request and time it; never raises for server or network trouble (it lands in ``error``)."""
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start)
    try:
        async with asyncio.timeout(timeout):
            async with session.post(base + path, json=body, headers=headers) as resp:
                res.status = resp.status
                if resp.status != 200:
                    res.error = f"http_{resp.status}"
                    res.error_detail = _error_detail(await resp.text())
                elif body.get("stream"):
                    await _read_stream(resp, res, endpoint)
                else:
                    _read_whole(await resp.json(content_type=None), res, endpoint)
    except TimeoutError:
        res.error, res.error_detail = "timeout", f"no complete response within {timeout:g} s"
    except aiohttp.ClientConnectorError as e:
        res.error, res.error_detail = "connect_error", str(e)[:300]
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
        res.error, res.error_detail = "disconnected", str(e)[:300]
    except aiohttp.ClientError as e:
        res.error, res.error_detail = "client_error", f"{type(e).__name__}: {e}"[:300]
    except ValueError as e:  # unparseable JSON body
        res.error, res.error_detail = "bad_response", str(e)[:300]
    res.end = time.perf_counter()
    if res.ok and res.token_source == "none" and body.get("stream"):
        res.output_tokens = len(res.chunk_times)
        res.token_source = "chunks"
    return res


async def _read_stream(resp: aiohttp.ClientResponse, res: RequestResult, endpoint: Endpoint) -> None:
    done = False
    buf = b""
    async for raw in resp.content:
        buf += raw
        if not buf.endswith(b"\n"):
            continue
        line, buf = buf.decode("utf-8", "replace").strip(), b""
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        now = time.perf_counter() - res.start
        try:
            chunk = json.loads(data)
        except ValueError:
            res.error, res.error_detail = "bad_response", f"unparseable SSE data: {data[:200]}"
            return
        if "error" in chunk:
            res.error, res.error_detail = "stream_error", _error_detail(data)
            return
        for choice in chunk.get("choices") or []:
            text = _delta_text(choice, endpoint)
            if text:
                if res.ttft is None:
                    res.ttft = now
                res.chunk_times.append(now)
                res.output_chars += len(text)
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
        _take_usage(chunk, res)
    if not done:
        res.error, res.error_detail = "stream_error", "stream ended without [DONE]"
        return
    res.ok = True


def _read_whole(payload: dict[str, Any], res: RequestResult, endpoint: Endpoint) -> None:
    now = time.perf_counter() - res.start
    choices = payload.get("choices") or []
    if not choices:
        res.error, res.error_detail = "bad_response", "response has no choices"
        return
    text = _delta_text(choices[0], endpoint)
    res.ttft = now  # without streaming the first token arrives with the last
    res.chunk_times = [now] if text else []
    res.output_chars = len(text)
    res.finish_reason = choices[0].get("finish_reason")
    _take_usage(payload, res)
    res.ok = True


def _take_usage(payload: dict[str, Any], res: RequestResult) -> None:
    usage = payload.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        res.output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            res.prompt_tokens = int(usage["prompt_tokens"])
        res.token_source = "usage"
