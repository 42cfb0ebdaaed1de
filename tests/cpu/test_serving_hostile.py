"""Hostile and faulty input against the real app (issue 18): ``python -m serving`` on the tiny model, CPU, loopback.

One server for the module, started as users start it (so the API key travels the way ``python -m serving``
sends it), with two test-only hooks (``serving/testing_hooks.py``): a control file that slows or hangs the
engine loop, and a ``user`` value that raises inside request preparation. Small limits (2 slots, 2 waiting:
admission limit 4) keep the bursts small. Figures asserted are the issue's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

try:  # openai >= 3 ships its HTTP client as httpx2 (same API as httpx)
    import httpx2 as httpx
except ImportError:
    import httpx
from prometheus_client.parser import text_string_to_metric_families
from serve_app import free_port

from training.demo import stop_server  # SIGINT for Ray's clean shutdown, then SIGKILL

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-chat"
KEY = f"sk-hostile-{uuid.uuid4().hex}"
SLOTS, WAITING = 2, 2
LIMIT = SLOTS + WAITING
RAISE_USER = "raise-please"
STALL_S = 2.0


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    port, metrics_port = free_port(), free_port()
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "served_model_name": MODEL, "port": port, "ray_metrics_export_port": metrics_port,
        "engine_stall_timeout_s": STALL_S,
        "engine": {"device": "cpu", "max_model_len": 256, "max_num_seqs": SLOTS, "max_waiting": WAITING,
                   "warmup": False},
        # Ray's own check would restart the stalled replica mid-test; the stall test reads /health instead
        "deployment": {"num_cpus": 1, "health_check_period_s": 600, "health_check_timeout_s": 600},
    }))
    control = tmp / "loop-control"
    log = tmp / "serve.log"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": ray_tmp,
           "API_KEYS": f"other-key,{KEY}", "SERVING_TEST_LOOP_CONTROL_FILE": str(control),
           "SERVING_TEST_RAISE_FOR_USER": RAISE_USER, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120"}
    env.pop("API_KEYS_FILE", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving", "--config", str(cfg), "--model", str(tiny_model)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text(errors='replace')[-6000:]}")
            try:
                if httpx.get(base + "/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-6000:]
            time.sleep(1)
        yield {"base": base, "control": control, "log": log, "ray_tmp": Path(ray_tmp), "proc": proc, "port": port,
               "metrics_port": metrics_port}
    finally:
        control.unlink(missing_ok=True)
        stop_server(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


AUTH = {"Authorization": f"Bearer {KEY}"}


def _chat_body(content: str = "hi", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **kw}


def _metric(base: str, name: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _is_openai_error(resp, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


class Stream:
    """A streamed completion read in a thread; records when each SSE chunk arrived."""

    def __init__(self, base: str, max_tokens: int):
        self.times: list[float] = []
        self.status: int | None = None
        self.started = threading.Event()
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}
        self.thread = threading.Thread(target=self._run, args=(base, body), daemon=True)
        self.thread.start()

    def _run(self, base: str, body: dict) -> None:
        with httpx.Client(timeout=120) as c, c.stream("POST", base + "/v1/completions", json=body,
                                                      headers=AUTH) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.times.append(time.monotonic())
                    self.started.set()
        self.started.set()

    def gaps(self, start: float, end: float) -> list[float]:
        t = [x for x in self.times if start <= x <= end] + [x for x in self.times if x > end][:1]
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def test_eight_20mb_bodies_get_413_while_a_stream_flows_and_health_answers(server):
    """Finding 1: 8 concurrent 20 MB bodies are refused at the door; a running stream's inter-token gap stays
    under 1 s and /health answers under 200 ms meanwhile."""
    base = server["base"]
    server["control"].write_text("0.03")  # 30 ms decode steps: the stream outlives the attack
    try:
        stream = Stream(base, max_tokens=200)
        assert stream.started.wait(60) and stream.status == 200
        payload = json.dumps(_chat_body("x" * (20 << 20))).encode()
        health_ms: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(timeout=10) as c:
                c.get(base + "/health")  # connection opened before the clock starts
                warm.set()
                while not stop.is_set():
                    t0 = time.monotonic()
                    assert c.get(base + "/health").status_code == 200
                    health_ms.append((time.monotonic() - t0) * 1000)
                    time.sleep(0.05)

        def attack(_: int):
            with httpx.Client(timeout=60) as c:
                try:
                    r = c.post(base + "/v1/chat/completions", content=payload,
                               headers={**AUTH, "Content-Type": "application/json"})
                except httpx.TransportError as e:  # the server may close before the client has sent it all
                    return e
                return r

        warm = threading.Event()
        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        assert warm.wait(30)
        t_start = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(attack, range(8)))
        t_end = time.monotonic()
        time.sleep(0.5)
        stop.set()
        prober.join(15)
        stream.thread.join(120)
    finally:
        server["control"].unlink(missing_ok=True)
    answered = [r for r in results if not isinstance(r, Exception)]
    assert answered, f"no 413 came back: {results}"
    for r in answered:
        _is_openai_error(r, 413, code="request_too_large")
    assert stream.times and stream.times[-1] > t_end, "the stream ended before the attack did: nothing measured"
    gaps = stream.gaps(t_start, t_end)
    assert gaps and max(gaps) < 1.0, f"inter-token gaps during the attack: max {max(gaps):.3f} s"
    assert health_ms and max(health_ms) < 200, f"/health during the attack: max {max(health_ms):.0f} ms"

    def chunks():  # no Content-Length: the limit must hold while reading
        yield payload[: 1 << 20]
        for i in range(1 << 20, len(payload), 1 << 20):
            yield payload[i:i + (1 << 20)]

    try:
        r = httpx.post(base + "/v1/chat/completions", content=chunks(),
                       headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    except httpx.TransportError as e:
        pytest.fail(f"the chunked 20 MB body got no answer: {e!r}")
    assert "content-length" not in r.request.headers
    _is_openai_error(r, 413, code="request_too_large")
    print(json.dumps({"attack_s": round(t_end - t_start, 3), "answered_413": len(answered),
                      "max_gap_s": round(max(gaps), 3), "max_health_ms": round(max(health_ms), 1)}))


def test_nested_surrogate_empty_prompt_and_wrong_types_are_400s_naming_the_field(server):
    """Findings 3 and 5: no bare 500s and no coercion; nulls for optional fields stay accepted."""
    base = server["base"]
    before = _metric(base, "vllm:request_errors_total", status_code="400")
    post = lambda path, **kw: httpx.post(base + path, headers={**AUTH, "Content-Type": "application/json"},  # noqa: E731
                                         timeout=60, **kw)

    nest = '{"a": ' * 1000 + "1" + "}" * 1000  # 6 KB, 1,000 nested objects
    deep = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "user": {nest}}}'
    err = _is_openai_error(post("/v1/chat/completions", content=deep), 400)
    assert "nests deeper than" in err["message"]
    medium = deep.replace(nest, '{"a": ' * 100 + "1" + "}" * 100)
    _is_openai_error(post("/v1/chat/completions", content=medium), 400, param="user")

    lone = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "bad \\ud800 here"}}]}}'
    err = _is_openai_error(post("/v1/chat/completions", content=lone), 400, param="messages.0.content")
    assert "surrogate" in err["message"]

    for prompt in ("", [""], []):
        _is_openai_error(post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400, param="prompt")

    for field, value in (("max_tokens", "10"), ("stream", "yes"), ("temperature", "0.5"), ("n", 1.5)):
        _is_openai_error(post("/v1/chat/completions", json=_chat_body(**{field: value})), 400, param=field)
    _is_openai_error(post("/v1/completions", json={"model": MODEL, "prompt": [False, True]}), 400, param="prompt")

    ok = post("/v1/chat/completions", json=_chat_body(max_tokens=4, seed=None, stop=None, user=None,
                                                      stream_options=None, top_logprobs=None))
    assert ok.status_code == 200, ok.text
    ok = post("/v1/completions", json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 1})
    assert ok.status_code == 200, ok.text
    assert _metric(base, "vllm:request_errors_total", status_code="400") - before == 11


def test_unexpected_exception_is_an_openai_500_with_request_id_logged_and_counted(server):
    """The catch-all (a test-only hook raises inside request preparation, standing in for a bug)."""
    base = server["base"]
    before = _metric(base, "vllm:request_errors_total", status_code="500")
    rid = f"req-{uuid.uuid4().hex}"
    r = httpx.post(base + "/v1/chat/completions", json=_chat_body(user=RAISE_USER),
                   headers={**AUTH, "x-request-id": rid}, timeout=60)
    err = _is_openai_error(r, 500, code="internal_error")
    assert err["type"] == "server_error" and rid in err["message"] and "test hook" not in err["message"]
    assert r.headers["x-request-id"] == rid
    assert _metric(base, "vllm:request_errors_total", status_code="500") == before + 1
    deadline = time.monotonic() + 20  # Ray writes the replica's log asynchronously
    while True:
        logs = "".join(p.read_text(errors="replace") for p in server["ray_tmp"].rglob("*")
                       if p.is_file() and p.suffix in (".log", ".out", ".err"))
        tracebacks = [m.start() for m in re.finditer(rf"request {rid} failed", logs)]
        if tracebacks or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(tracebacks) == 1, f"{len(tracebacks)} log records of the failure"
    assert "RuntimeError: test hook" in logs[tracebacks[0]:tracebacks[0] + 5000]


def test_burst_of_3x_the_admission_limit_gets_prompt_429s_with_retry_after(server):
    """Finding 4: the API's own admission answers at once; Ray's proxy does not queue the burst."""
    base = server["base"]
    server["control"].write_text("0.05")  # streams hold their places for ~5 s
    try:
        holders = [Stream(base, max_tokens=100) for _ in range(LIMIT)]
        deadline = time.monotonic() + 60
        while httpx.get(base + "/ready", timeout=5).json().get("running", 0) + \
                httpx.get(base + "/ready", timeout=5).json().get("waiting", 0) < LIMIT:
            assert time.monotonic() < deadline, "the holding streams were never all admitted"
            time.sleep(0.1)
        body = json.dumps(_chat_body(max_tokens=4)).encode()
        clients = [httpx.Client(timeout=30) for _ in range(2 * LIMIT)]
        for c in clients:  # connections opened beforehand: the figure is the server's answer, not TCP set-up
            c.get(base + "/health")
        gate = threading.Barrier(2 * LIMIT)

        def one(c):
            gate.wait()
            t0 = time.monotonic()
            r = c.post(base + "/v1/chat/completions", content=body,
                       headers={**AUTH, "Content-Type": "application/json"})
            return r, (time.monotonic() - t0) * 1000

        with ThreadPoolExecutor(2 * LIMIT) as ex:
            burst = list(ex.map(one, clients))  # with the holders: 3x the limit at once
        for c in clients:
            c.close()
    finally:
        server["control"].unlink(missing_ok=True)
    for t in holders:
        t.thread.join(60)
    for r, _ in burst:
        _is_openai_error(r, 429)
        assert int(r.headers["retry-after"]) >= 1
    ms = sorted(m for _, m in burst)
    print(json.dumps({"burst": len(burst), "refusal_ms_p50": round(ms[len(ms) // 2], 1), "refusal_ms_max":
                      round(ms[-1], 1)}))
    # Refusals pass one at a time through Ray's Python proxy (~5 ms each here), so the 8th waits for 7 others:
    # on this 2-core box the median was 30-50 ms (the JSON line above is the figure) and before the fix they
    # waited in Ray's queue for up to 16.8 s. The bound catches that queueing with room for the CI box's noise
    # (a full suite run measured a median of 50.4 ms, the slowest 65 ms), not the figure itself.
    assert ms[len(ms) // 2] < 150 and ms[-1] < 500, f"429 latencies (ms): {ms}"
    assert all(t.status == 200 for t in holders)


def test_surface_routes_docs_and_openapi(server):
    """Finding 6: OpenAI-shaped 404/405, /docs off, an OpenAPI document with the real bodies and media types."""
    base = server["base"]
    _is_openai_error(httpx.get(base + "/nope", timeout=10), 404, code="unknown_route")
    r = httpx.get(base + "/v1/chat/completions", headers=AUTH, timeout=10)
    err = _is_openai_error(r, 405, code="method_not_allowed")
    assert "POST" in r.headers.get("allow", "") and "GET" in err["message"]
    for page in ("/docs", "/redoc"):
        _is_openai_error(httpx.get(base + page, timeout=10), 404)
    doc = httpx.get(base + "/openapi.json", timeout=10).json()
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(doc["paths"]["/"]["get"]["responses"]["200"]["content"]) == ["text/html"]
    assert httpx.get(base + "/metrics", timeout=10).headers["content-type"].startswith("text/plain")


def _listeners(port: int) -> set[str]:
    """Addresses listening on TCP ``port`` (IPv4 and IPv6), from /proc/net/tcp*."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                out.add("127.0.0.1" if addr == "0100007F" else "0.0.0.0" if addr == "00000000" else addr)
    return out


def test_http_and_ray_metrics_listen_on_loopback_by_default(server):
    """Finding 6: no host given, so the API and Ray's metrics exporter bind 127.0.0.1 only."""
    assert _listeners(server["port"]) == {"127.0.0.1"}
    assert _listeners(server["metrics_port"]) == {"127.0.0.1"}
    assert httpx.get(f"http://127.0.0.1:{server['metrics_port']}/metrics", timeout=10).status_code == 200


def test_schemathesis_against_the_apps_own_openapi_finds_no_5xx(server):
    """A bounded schema-fuzzing run (a few hundred requests, well under 2 minutes): no 5xx anywhere."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings

    base = server["base"]
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    budget_end = time.monotonic() + 90
    seen: dict[int, int] = {}
    seen_bodies: list[int] = []
    failures: list[str] = []
    t0 = time.monotonic()
    def fuzz(op, examples: int):
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case) -> None:
            if time.monotonic() > budget_end:
                return
            if isinstance(case.body, dict):
                if case.body.get("stream"):
                    case.body["stream"] = False  # a streamed 200 is read whole below either way
                if len(seen_bodies) % 2 == 0:  # half name the served model, so the fuzzing reaches the engine
                    case.body["model"] = MODEL
                seen_bodies.append(1)
            resp = case.call(base_url=base, headers=AUTH, timeout=60)
            seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
            if resp.status_code >= 500:
                failures.append(f"{op.method} {op.path} {case.body!r:.300} -> {resp.status_code} {resp.text[:300]}")

        run()

    for result in schema.get_all_operations():
        op = result.ok()
        fuzz(op, 5 if op.path in ("/metrics", "/") else 150 if op.method.upper() == "POST" else 20)
    total = sum(seen.values())
    print(json.dumps({"requests": total, "seconds": round(time.monotonic() - t0, 1),
                      "by_status": dict(sorted(seen.items()))}))
    assert total >= 200, seen
    assert not failures, "\n".join(failures[:10])


def test_stuck_engine_loop_turns_health_503(server):
    """Liveness: a hung engine loop (test-only hook) makes /health 503 within the stall timeout; it recovers."""
    base = server["base"]
    assert httpx.get(base + "/health", timeout=10).status_code == 200
    server["control"].write_text("hang")
    t0 = time.monotonic()
    try:
        while True:
            r = httpx.get(base + "/health", timeout=10)
            if r.status_code != 200 or time.monotonic() - t0 > STALL_S + 15:
                break
            time.sleep(0.2)
        waited = time.monotonic() - t0
        err = _is_openai_error(r, 503, code="engine_stalled")
        assert "stalled" in err["message"] and waited >= STALL_S - 0.6
    finally:
        server["control"].unlink(missing_ok=True)
    deadline = time.monotonic() + 10
    while httpx.get(base + "/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "/health did not recover once the loop ran again"
        time.sleep(0.2)


def test_api_key_is_in_no_log_file(server):
    """Finding 2: after authenticated traffic, the key is in no file under Ray's temp folder nor the app's log.
    A request id sent along is found there (the logs are searched for real)."""
    base = server["base"]
    rid = f"req-{uuid.uuid4().hex}"
    r = httpx.post(base + "/v1/chat/completions", json=_chat_body(max_tokens=2), headers={**AUTH, "x-request-id": rid},
                   timeout=60)
    assert r.status_code == 200
    assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    files = [p for p in [*server["ray_tmp"].rglob("*"), server["log"]] if p.is_file() and not p.is_symlink()]
    deadline = time.monotonic() + 20
    while not any(rid.encode() in p.read_bytes() for p in files if p.suffix in (".log", ".out", ".err")):
        assert time.monotonic() < deadline, "the request's log line never reached a log file"
        time.sleep(1)
        files = [p for p in [*server["ray_tmp"].rglob("*"), server["log"]] if p.is_file() and not p.is_symlink()]
    leaks = []
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        if KEY.encode() in data:
            leaks.append(str(p))
    assert len(files) > 20 and not leaks, f"the API key is in {leaks}"
    # nor in the environment of the processes the server started (Ray's raylet, workers and the replica would
    # inherit it); the server itself was given it by this test, as a user's shell gives it
    leader = server["proc"].pid
    procs = [d for d in Path("/proc").iterdir() if d.name.isdigit() and int(d.name) != leader
             and _sid(int(d.name)) == leader]
    assert len(procs) > 3
    in_env = [d.name for d in procs if KEY.encode() in _environ(d)]
    assert not in_env, f"the API key is in the environment of processes {in_env}"


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _environ(proc: Path) -> bytes:
    try:
        return (proc / "environ").read_bytes()
    except OSError:
        return b""
