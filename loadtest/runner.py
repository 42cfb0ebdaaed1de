"""Run one load level: a fixed number of requests in flight, or Poisson arrivals at a set rate.

A level is a warm-up phase (left out of the results, run to completion), a scrape of the server's ``/metrics``,
the measured phase (bounded by a request count and a time limit: no new request starts after either; requests
in flight finish or time out), a second scrape.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from loadtest.client import Endpoint, Prompt, RequestResult, build_body, send_request
from loadtest.stats import SERVER_COUNTERS, parse_prometheus


@dataclass(frozen=True)
class Level:
    mode: Literal["concurrency", "rate"]
    value: float  # requests in flight, or requests/s (inf: all at once)

    @property
    def label(self) -> str:
        if self.mode == "concurrency":
            return f"concurrency {int(self.value)}"
        return "rate inf" if math.isinf(self.value) else f"rate {self.value:g}/s"


@dataclass
class RunOptions:
    base: str
    model: str
    endpoint: Endpoint = "chat"
    stream: bool = True
    stream_usage: bool = True  # send stream_options.include_usage (servers that reject it: off)
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = 600.0
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None
    requests: int | None = 100
    requests_per_concurrency: int = 0  # concurrency levels measure at least this many requests per slot
    duration: float | None = 300.0
    warmup: int = 2
    max_concurrency: int | None = None  # cap on requests in flight in rate mode
    seed: int = 0
    progress: bool = True
    metrics_url: str | None = None
    metrics_settle: float = 10.0  # most seconds to wait for the server's counters to settle


@dataclass
class LevelRun:
    level: Level
    results: list[RequestResult]
    duration: float
    warmup_results: list[RequestResult]
    server_before: dict[str, float] | None = None
    server_after: dict[str, float] | None = None
    metrics_error: str | None = None


class _Prompts:
    def __init__(self, prompts: list[Prompt]):
        self.prompts, self.i = prompts, 0

    def next(self) -> Prompt:
        p = self.prompts[self.i % len(self.prompts)]
        self.i += 1
        return p


def _bar(level: Level, total: int | None, phase: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{level.label} {phase}", unit="req", leave=phase == "measure",
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


async def _phase(session: aiohttp.ClientSession, level: Level, prompts: _Prompts, opts: RunOptions,
                 count: int | None, duration: float | None, phase: str) -> tuple[list[RequestResult], float]:
    """Send requests until ``count`` were started or ``duration`` seconds passed; wait for all of them."""
    results: list[RequestResult] = []
    started = 0
    t0 = time.perf_counter()
    deadline = t0 + duration if duration else math.inf
    bar = _bar(level, count, phase, opts.progress)

    def more() -> bool:
        return (count is None or started < count) and time.perf_counter() < deadline

    async def one() -> None:
        body = build_body(opts.model, prompts.next(), opts.endpoint, opts.stream, opts.ignore_eos,
                          opts.temperature, opts.extra_body, opts.stream_usage)
        r = await send_request(session, opts.base, body, opts.endpoint, opts.headers, opts.timeout)
        results.append(r)
        bar.update(1)
        bar.set_postfix(ok=sum(x.ok for x in results), err=sum(not x.ok for x in results), refresh=False)

    try:
        if level.mode == "concurrency":
            async def worker() -> None:
                nonlocal started
                while more():
                    started += 1
                    await one()

            await asyncio.gather(*(worker() for _ in range(int(level.value))))
        else:
            rng = random.Random(opts.seed)
            sem = asyncio.Semaphore(opts.max_concurrency) if opts.max_concurrency else None
            tasks: list[asyncio.Task] = []

            async def limited() -> None:
                if sem is None:
                    await one()
                    return
                async with sem:
                    await one()

            next_at = time.perf_counter()
            while True:
                if math.isfinite(level.value):
                    next_at += rng.expovariate(level.value)
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(min(delay, max(deadline - time.perf_counter(), 0)))
                if not more():
                    break
                started += 1
                tasks.append(asyncio.create_task(limited()))
            await asyncio.gather(*tasks)
    finally:
        bar.close()
    if not results:
        return results, 0.0
    first = min(r.start for r in results)
    last = max(r.end for r in results)
    return results, last - first


async def scrape(session: aiohttp.ClientSession, url: str, model: str | None) -> dict[str, float]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=15)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {resp.status}")
        return parse_prometheus(await resp.text(), model)


async def settled_scrape(session: aiohttp.ClientSession, opts: RunOptions, base: dict[str, float],
                         want: int) -> dict[str, float]:
    """Scrape until the server's success counter has counted ``want`` requests more than in ``base``, for at
    most ``opts.metrics_settle`` seconds: servers that export metrics on a timer count a finished request a
    little after its last byte."""
    key = SERVER_COUNTERS["successes"]
    deadline = time.perf_counter() + opts.metrics_settle
    cur = await scrape(session, opts.metrics_url, opts.model)
    while key in cur and cur[key] - base.get(key, 0.0) < want and time.perf_counter() < deadline:
        await asyncio.sleep(0.25)
        cur = await scrape(session, opts.metrics_url, opts.model)
    return cur


async def run_level(session: aiohttp.ClientSession, level: Level, prompts: list[Prompt],
                    opts: RunOptions) -> LevelRun:
    """Warm-up, scrape, measure, scrape. The server's counters are read once they have counted the warm-up
    (``before``) and the measured requests (``after``), so the difference is this level's exactly."""
    feed = _Prompts(prompts)
    start = before = after = None
    err = None
    if opts.metrics_url:
        try:
            start = await scrape(session, opts.metrics_url, opts.model)
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
            err = f"{type(e).__name__}: {e}"
    warm: list[RequestResult] = []
    if opts.warmup:
        warm, _ = await _phase(session, level, feed, opts, opts.warmup, None, "warm-up")
    if start is not None:
        try:
            before = await settled_scrape(session, opts, start, sum(r.ok for r in warm))
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
            err = f"{type(e).__name__}: {e}"
    count = opts.requests
    if count and level.mode == "concurrency":
        count = max(count, opts.requests_per_concurrency * int(level.value))
    results, duration = await _phase(session, level, feed, opts, count, opts.duration, "measure")
    if before is not None:
        try:
            after = await settled_scrape(session, opts, before, sum(r.ok for r in results))
        except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
            err = f"{type(e).__name__}: {e}"
    return LevelRun(level, results, duration, warm, before, after, err)
