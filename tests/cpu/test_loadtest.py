"""Load-test tool: stats and parsing, a sweep against test-double servers (a scripted fake OpenAI server with
known delays and counts, one that fails, a closed port), and a sweep against the real HF-``generate`` baseline
server on the tiny model. The sweep against this project's Ray Serve app is in ``test_loadtest_serving.py``."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from serve_app import free_port

from loadtest.client import RequestResult, api_base
from loadtest.prompts import PromptError, load_prompts, synthetic_prompts
from loadtest.stats import SLO, compare_with_server, parse_prometheus, server_delta, summarize

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": ""}


class FakeServer:
    """An OpenAI-compatible double with scripted timing: TTFT ``ttft`` s, then a token every ``itl`` s; every
    ``fail_every``-th request answers ``fail_status``. Counts what it served on /metrics (vLLM names)."""

    def __init__(self, ttft: float = 0.03, itl: float = 0.005, fail_every: int = 0, fail_status: int = 500,
                 usage: bool = True, prompt_tokens: int = 7, count_delay: float = 0.0):
        self.ttft, self.itl, self.fail_every, self.fail_status = ttft, itl, fail_every, fail_status
        self.usage, self.prompt_tokens, self.count_delay = usage, prompt_tokens, count_delay
        self.n = 0
        self.counts = {"vllm:prompt_tokens_total": 0, "vllm:generation_tokens_total": 0,
                       "vllm:request_success_total": 0}
        self.bodies: list[dict] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        self.n += 1
        if self.fail_every and self.n % self.fail_every == 0:
            status = self.fail_status if self.n % (2 * self.fail_every) else 429
            return web.json_response({"error": {"message": f"scripted failure {status}", "type": "server_error",
                                                 "param": None, "code": status}}, status=status)
        n_out = body["max_tokens"]
        if not body.get("stream"):
            await asyncio.sleep(self.ttft + self.itl * (n_out - 1))
            self._count(n_out)
            return web.json_response({"choices": [{"index": 0, "finish_reason": "length", "message": {
                "role": "assistant", "content": "".join(f" t{i}" for i in range(n_out))}}], "usage": {
                "prompt_tokens": self.prompt_tokens, "completion_tokens": n_out}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(self.ttft)
        for i in range(n_out):
            if i:
                await asyncio.sleep(self.itl)
            chunk = {"choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'length'}]})}"
                         "\n\n".encode())
        if self.usage and (body.get("stream_options") or {}).get("include_usage"):
            u = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n_out,
                 "total_tokens": self.prompt_tokens + n_out}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': u})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        self._count(n_out)
        return resp

    def _count(self, n_out: int) -> None:
        if self.count_delay:  # like a server exporting its metrics on a timer
            asyncio.get_running_loop().call_later(self.count_delay, self._add, n_out)
        else:
            self._add(n_out)

    def _add(self, n_out: int) -> None:
        self.counts["vllm:prompt_tokens_total"] += self.prompt_tokens
        self.counts["vllm:generation_tokens_total"] += n_out
        self.counts["vllm:request_success_total"] += 1

    async def metrics(self, _: web.Request) -> web.Response:
        text = "".join(f'# TYPE {k} counter\n{k}{{model_name="fake"}} {v}\n{k}{{model_name="other"}} 1000\n'
                       for k, v in self.counts.items())
        return web.Response(text=text)

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    def __enter__(self) -> FakeServer:
        app = web.Application()
        app.add_routes([web.post("/v1/chat/completions", self.chat), web.get("/metrics", self.metrics),
                        web.get("/v1/models", self.models)])
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.runner = runner
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loadtest", "--no-progress", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# --- units --------------------------------------------------------------------------------------------------------

def _result(ttft: float, gaps: list[float], ok: bool = True, tokens: int | None = None) -> RequestResult:
    times = [ttft]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestResult(ok=ok, start=0.0, end=times[-1] if ok else 0.1, ttft=ttft if ok else None,
                         chunk_times=times if ok else [], output_tokens=(tokens or len(times)) if ok else 0,
                         prompt_tokens=5 if ok else None, token_source="usage" if ok else "none",
                         error=None if ok else "http_500")


def test_summary_percentiles_goodput_and_slos():
    fast = [_result(0.1, [0.01] * 9) for _ in range(8)]
    slow = [_result(2.0, [0.2] * 9) for _ in range(2)]
    failed = [_result(0, [], ok=False)]
    slos = [SLO.parse("ttft_p50<1s"), SLO.parse("itl_p95 < 150ms")]
    s = summarize(fast + slow + failed, duration=10.0, slos=slos, max_error_rate=0.1)
    assert s["requests"] == 11 and s["successes"] == 10 and s["errors"] == {"http_500": 1}
    assert s["output_tokens"] == 100 and s["prompt_tokens"] == 50
    assert s["requests_per_s"] == pytest.approx(1.0) and s["output_tokens_per_s"] == pytest.approx(10.0)
    assert s["ttft"]["p50"] == pytest.approx(0.1) and s["ttft"]["max"] == pytest.approx(2.0)
    assert s["ttft"]["p90"] == pytest.approx(2.0)  # 10 values, 2 of them slow: numpy linear p90 lands on 2.0
    assert s["itl"]["p50"] == pytest.approx(0.01) and s["itl"]["p95"] == pytest.approx(0.2)
    checks = {c["metric"]: c["ok"] for c in s["slo"]["checks"]}
    assert checks == {"ttft": True, "itl": False} and s["slo"]["met"] is False
    assert s["goodput"]["requests_per_s"] == pytest.approx(0.8)  # only the 8 fast requests meet both per request
    assert s["tpot"]["p50"] == pytest.approx(0.01)
    ok = summarize(fast, duration=1.0, slos=[SLO.parse("ttft_p99<1s"), SLO.parse("e2e_max<500ms")])
    assert ok["slo"]["met"] is True and ok["goodput"]["fraction"] == 1.0
    assert summarize(fast + failed, 1.0, [])["slo"]["met"] is False  # default: no failures allowed


@pytest.mark.parametrize("spec", ["ttft<1s", "ttft_p95<1", "latency_p95<1s", "itl_p95<100us"])
def test_bad_slo_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="expected METRIC_STAT"):
        SLO.parse(spec)


def test_prometheus_parsing_and_server_comparison():
    text = ('# HELP vllm:generation_tokens_total x\nvllm:generation_tokens_total{model_name="m"} 10.0\n'
            'vllm:generation_tokens_total{model_name="n"} 99\n'
            'vllm:request_success_total{finished_reason="stop",model_name="m"} 2\n'
            'vllm:request_success_total{finished_reason="length",model_name="m"} 3\n'
            'vllm:time_to_first_token_seconds_sum{model_name="m"} 1.5\n'
            'vllm:time_to_first_token_seconds_count{model_name="m"} 5\nother_metric NaN\n')
    after = parse_prometheus(text, "m")
    assert after["vllm:generation_tokens_total"] == 10 and after["vllm:request_success_total"] == 5
    assert "other_metric" not in after
    d = server_delta({"vllm:generation_tokens_total": 4}, after)
    assert d["output_tokens"] == 6 and d["successes"] == 5 and d["ttft_mean_s"] == pytest.approx(0.3)
    cmp = compare_with_server({"output_tokens": 6, "successes": 4, "prompt_tokens": 0}, d)
    assert cmp["counters"]["output_tokens"]["match"] and not cmp["counters"]["successes"]["match"]
    assert cmp["agree"] is False


def test_api_base_normalises_urls():
    assert api_base("http://h:8000") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/") == "http://h:8000/v1"
    assert api_base("http://h:8000/v1/chat/completions") == "http://h:8000/v1"


def test_prompt_sources(tmp_path):
    folder = SHARED / "data" / "instructionwild"
    if folder.is_dir():
        ps = load_prompts(str(folder), max_tokens=8)
        assert len(ps) > 1000 and all(p.text.strip() for p in ps)
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "yo"}]}) + "\n")
    p = load_prompts(str(tmp_path / "chat.jsonl"), 4)[0]
    assert p.messages == [{"role": "user", "content": "hi"}]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question_text": "x"}) + "\n")
    with pytest.raises(PromptError, match=r"bad.jsonl:1: no prompt field"):
        load_prompts(str(tmp_path / "bad.jsonl"), 4)
    with pytest.raises(PromptError, match="field 'q' missing"):
        load_prompts(str(tmp_path / "bad.jsonl"), 4, field="q")
    syn = synthetic_prompts(3, input_tokens=20, max_tokens=5)
    assert len(syn) == 3 and all(len(s.text.split()) == 20 for s in syn)


def test_synthetic_prompts_exact_length_with_tokenizer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for p in synthetic_prompts(3, input_tokens=33, max_tokens=4, tokenizer=str(tiny_model)):
        assert p.input_tokens == 33 and abs(len(tok(p.text, add_special_tokens=False)["input_ids"]) - 33) <= 2


# --- sweeps against test doubles ----------------------------------------------------------------------------------

def test_sweep_against_fake_server_writes_all_outputs(tmp_path):
    out = tmp_path / "lt"
    with FakeServer(ttft=0.05, itl=0.005) as srv:
        proc = run_cli("--url", srv.url, "--model", "fake", "--out", str(out), "--concurrency", "1,4",
                       "--rate", "20", "--requests", "12", "--warmup", "2", "--output-tokens", "6",
                       "--input-tokens", "10", "--ignore-eos", "--slo", "ttft_p95<1s", "--slo", "itl_p95<5ms",
                       "--metrics-url", srv.url + "/metrics")
        served = srv.n
        body = srv.bodies[0]
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} >= {"results.json", "levels.csv", "requests.jsonl", "report.md",
                                               "throughput_latency.png", "latency_vs_load.png"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 6
    res = json.loads((out / "results.json").read_text())
    assert [(lv["mode"], lv["value"]) for lv in res["levels"]] == [("concurrency", 1), ("concurrency", 4),
                                                                    ("rate", 20)]
    assert served == 3 * (12 + 2)  # warm-up requests are sent but left out of the results
    for lv in res["levels"]:
        assert lv["requests"] == lv["successes"] == 12 and lv["warmup_requests"] == 2
        assert lv["output_tokens"] == 72 and lv["prompt_tokens"] == 84 and lv["token_source"] == {"usage": 12}
        assert 0.05 <= lv["ttft"]["p50"] < 1.0  # scripted TTFT, plus loopback and scheduling noise
        assert 0.004 <= lv["itl"]["p50"] < 0.1
        assert lv["server_check"]["agree"], lv["server_check"]  # other model's 1000s filtered out by model_name
        assert lv["server"]["successes"] == 12
        checks = {c["metric"]: c for c in lv["slo"]["checks"]}
        assert checks["ttft"]["ok"] and not checks["itl"]["ok"] and not lv["slo"]["met"]  # ITL >= 5 ms scripted
    c1, c4 = res["levels"][0], res["levels"][1]
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]

    def most_in_flight(value: int) -> int:
        spans = [(r["start"], r["end"]) for r in rows if r["mode"] == "concurrency" and r["value"] == value]
        return max(sum(s <= start < e for s, e in spans) for start, _ in spans)

    assert most_in_flight(1) == 1 and 2 <= most_in_flight(4) <= 4  # the level's concurrency, not a timing ratio
    assert c1["requests"] == c4["requests"] == 12
    assert 0.8 < c1["mean_in_flight"] <= 1.05 and c4["mean_in_flight"] > 2.5
    assert res["summary"]["best"] == {"concurrency": None, "rate": None}
    assert res["summary"]["server_counts_agree"] is True
    rows = list(csv.DictReader((out / "levels.csv").open()))
    assert len(rows) == 3 and float(rows[1]["output_tokens_per_s"]) == pytest.approx(c4["output_tokens_per_s"])
    assert len((out / "requests.jsonl").read_text().splitlines()) == 36
    md = (out / "report.md").read_text()
    assert "concurrency 4" in md and "no level met the SLOs" in md and "agree" in md
    assert (out / "latency_vs_load.png").read_bytes()[:4] == b"\x89PNG"


def test_highest_load_meeting_slos_and_chunk_counting(tmp_path):
    out = tmp_path / "lt"
    # no usage asked for (--no-stream-usage): tokens are counted as content chunks
    with FakeServer(ttft=0.02, itl=0.002) as srv:
        proc = run_cli("--url", srv.url + "/v1", "--model", "fake", "--out", str(out), "--concurrency", "1,2",
                       "--requests", "6", "--warmup", "0", "--output-tokens", "4", "--slo", "ttft_p99<2s",
                       "--no-plots", "--duration", "30", "--no-stream-usage")
        assert all("stream_options" not in b and b["stream"] for b in srv.bodies)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert all(lv["token_source"] == {"chunks": 6} and lv["output_tokens"] == 24 for lv in res["levels"])
    assert res["summary"]["best"]["concurrency"]["value"] == 2
    assert "highest load meeting the SLOs: **concurrency 2**" in (out / "report.md").read_text()
    assert not (out / "latency_vs_load.png").exists()


def test_non_streaming_requests(tmp_path):
    out = tmp_path / "lt"
    with FakeServer(ttft=0.05, itl=0.01, count_delay=1.0) as srv:  # counters lag: the scrape waits for them
        proc = run_cli("--url", srv.url, "--model", "fake", "--out", str(out), "--concurrency", "2", "--no-stream",
                       "--requests", "4", "--warmup", "1", "--output-tokens", "5", "--no-plots",
                       "--metrics-url", srv.url + "/metrics")
        assert all(b["stream"] is False and "stream_options" not in b for b in srv.bodies)
    assert proc.returncode == 0, proc.stderr
    lv = json.loads((out / "results.json").read_text())["levels"][0]
    assert lv["successes"] == 4 and lv["output_tokens"] == 20 and lv["token_source"] == {"usage": 4}
    assert lv["ttft"]["p50"] >= 0.09 and lv["ttft"]["p50"] == pytest.approx(lv["e2e"]["p50"], rel=0.05)
    assert lv["itl"]["p50"] is None and lv["server_check"]["agree"]


def test_smoke_mode(tmp_path):
    with FakeServer(ttft=0.01, itl=0.001) as srv:
        proc = run_cli("--url", srv.url, "--model", "fake", "--out", str(tmp_path / "s"), "--smoke", "--no-plots")
        assert srv.n == 3 and all(b["max_tokens"] == 16 for b in srv.bodies)
    assert proc.returncode == 0 and "[concurrency 1] 3/3 ok" in proc.stderr, proc.stderr


def test_server_errors_are_counted_by_status(tmp_path):
    out = tmp_path / "lt"
    with FakeServer(ttft=0.01, itl=0.001, fail_every=3, fail_status=500) as srv:
        proc = run_cli("--url", srv.url, "--model", "fake", "--out", str(out), "--concurrency", "2",
                       "--requests", "12", "--warmup", "0", "--output-tokens", "3", "--slo", "ttft_p95<1s",
                       "--max-error-rate", "0.2")
    assert proc.returncode == 0, proc.stderr  # some succeeded: the sweep is a result, not a crash
    lv = json.loads((out / "results.json").read_text())["levels"][0]
    assert lv["errors"] == {"http_429": 2, "http_500": 2} and lv["successes"] == 8
    assert "scripted failure 500" in lv["error_examples"]["http_500"]
    assert lv["slo"]["met"] is False and lv["slo"]["error_rate_ok"] is False  # 4/12 > 0.2
    assert "http_500×2" in (out / "report.md").read_text()


def test_all_requests_failing_exits_1_with_report(tmp_path):
    out = tmp_path / "lt"
    with FakeServer(fail_every=1, fail_status=503) as srv:
        proc = run_cli("--url", srv.url, "--model", "fake", "--out", str(out), "--concurrency", "1",
                       "--requests", "4", "--warmup", "1")
    assert proc.returncode == 1 and "no request succeeded" in proc.stderr and "Traceback" not in proc.stderr
    lv = json.loads((out / "results.json").read_text())["levels"][0]
    assert lv["successes"] == 0 and sum(lv["errors"].values()) == 4 and lv["ttft"]["p50"] is None
    assert (out / "report.md").exists()


def test_unreachable_url_is_reported(tmp_path):
    out = tmp_path / "lt"
    port = free_port()  # bound then released: nothing listens there
    t0 = time.monotonic()
    proc = run_cli("--url", f"http://127.0.0.1:{port}", "--model", "m", "--out", str(out), "--requests", "3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot reach http://127.0.0.1:{port}/v1" in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["target"]["reachable"] is False and res["levels"] == []
    assert "Target error" in (out / "report.md").read_text()
    assert time.monotonic() - t0 < 60


def test_bad_arguments_exit_2(tmp_path):
    proc = run_cli("--url", "http://x", "--model", "m", "--prompts", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    proc = run_cli("--url", "http://x", "--model", "m", "--concurrency", "0,2")
    assert proc.returncode == 2 and "positive numbers" in proc.stderr
    proc = run_cli("--url", "http://x", "--model", "m", "--slo", "ttft<1s")
    assert proc.returncode == 2 and "METRIC_STAT" in proc.stderr


def test_gpu_helpers_levels_and_full_vocab_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from loadtest.gpu_report import capacity, capacity_from_metrics, full_vocab_tokenizer, levels

    assert levels(1) == [1] and levels(12) == [1, 2, 4, 8, 12] and levels(16) == [1, 2, 4, 8, 16]
    assert capacity_from_metrics('# HELP x\nvllm:cache_config_info{cache_dtype="int8",model_name="m",'
                                 'num_slots="6"} 1.0\n') == 6
    assert capacity_from_metrics("vllm:num_requests_running 0\n") is None
    (tmp_path / "server.log").write_text('INFO engine loaded {"kv_bytes_per_token": 256, "num_slots": 11}\n')
    assert capacity(None, tmp_path / "server.log") == 11
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 700}))
    (tmp_path / "merges.txt").write_text("stale")
    assert full_vocab_tokenizer(tmp_path) == 700 and not (tmp_path / "merges.txt").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert all(tok.decode([i]).strip() for i in range(3, 700))  # every sampled id shows up as text
    assert tok("the water", add_special_tokens=False)["input_ids"] == [3, tok.convert_tokens_to_ids("water")]


# --- the real baseline server (HF generate) -----------------------------------------------------------------------

def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout} s")


def test_sweep_against_baseline_generate_server(tiny_model, tmp_path):
    """A real model server (transformers ``generate``, static batches of 2): counts agree with its /metrics."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "loadtest.baseline_server", "--model", str(tiny_model),
                               "--name", "tiny", "--port", str(port), "--max-batch-size", "2", "--device", "cpu"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health", server)
        out = tmp_path / "lt"
        proc = run_cli("--url", url, "--model", "tiny", "--out", str(out), "--concurrency", "1,3", "--rate", "inf",
                       "--requests", "6", "--warmup", "1", "--output-tokens", "8", "--ignore-eos",
                       "--prompts", str(SHARED / "data" / "instructionwild" / "seed_prompts_en.jsonl")
                       if (SHARED / "data").is_dir() else "--input-tokens=12",
                       "--metrics-url", url + "/metrics", "--slo", "ttft_p99<30s", timeout=240)
        assert proc.returncode == 0, proc.stderr
        res = json.loads((out / "results.json").read_text())
        for lv in res["levels"]:
            assert lv["successes"] == 6 and lv["output_tokens"] == 48, lv
            assert lv["server_check"]["agree"], lv["server_check"]
            assert lv["prompt_tokens"] > 6 * 5
        assert res["summary"]["best"]["concurrency"]["value"] == 3
        # the GPU script's summary reads the same files (no CUDA here: no bandwidth, no nvidia-smi log)
        gpu_out = tmp_path / "gpu"
        gpu_out.mkdir()
        out.rename(gpu_out / "baseline")
        for cmd in (["facts", "--ckpt", str(tiny_model), "--no-bandwidth"], ["summary"]):
            summ = subprocess.run([sys.executable, "-m", "loadtest.gpu_report", *cmd, "--out", str(gpu_out)],
                                  cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
            assert summ.returncode == 0, summ.stderr
        s = json.loads((gpu_out / "summary.json").read_text())
        assert s["runs"]["project"] is None and s["weight_bytes"]["all"] > s["weight_bytes"]["without_embedding"]
        b = s["runs"]["baseline"]
        assert [lv["value"] for lv in b["levels"]] == [1, 3, "inf"] and b["single_stream_decode_tokens_per_s"] > 0
        assert "| concurrency 3 | 6 | 6 |" in (gpu_out / "summary.md").read_text()
        bad = run_cli("--url", url, "--model", "not-served", "--out", str(tmp_path / "bad"), "--concurrency", "1",
                      "--requests", "2", "--warmup", "0")
        assert bad.returncode == 1 and "http_404" in bad.stderr
    finally:
        server.terminate()
        server.wait(30)
