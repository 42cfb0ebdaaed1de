"""The chart's alerts and dashboard, checked by a real Prometheus (Debian's `prometheus` package: `make prometheus`).

1. ``promtool check rules`` and ``promtool test rules`` on the rendered PrometheusRule: input series for every
   alert, each firing when it should (with the summary's real numbers) and staying quiet when it should not.
2. The project's server (``python -m serving``, as the serving pod runs it) on the tiny model, a real Prometheus
   scraping it on loopback with the labels prometheus-operator's PodMonitor adds (namespace, pod, endpoint), good,
   4xx, 5xx (while loading) and aborted requests; then every dashboard query and every alert expression is
   evaluated through Prometheus' HTTP API and must return data. Kubernetes' service discovery is what stands in
   here: the scrape target is static.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "colossal-rlhf"
NS = "llm"
POD = "demo-colossal-rlhf-serving-5d8f9c7b6-x2k4q"  # a Deployment pod's name (the alerts select pod=~"demo-...")
MODEL = "tiny"

pytest.importorskip("helm_python")
sys.path.insert(0, str(ROOT / "k8s"))
import generate  # noqa: E402
from serve_app import free_port  # noqa: E402


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is missing: `make prometheus` installs Debian's prometheus (server and promtool)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _rules(values: dict) -> tuple[list[dict], dict]:
    objs = generate.render(values, name="demo", namespace=NS)
    rule = next(o for o in objs if o["kind"] == "PrometheusRule")
    return rule["spec"]["groups"], {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


VALUES = yaml.safe_load((CHART / "ci" / "rayservice-values.yaml").read_text())


# ----------------------------------------------------------------------------- promtool


def _series(metric: str, values: str, **labels: str) -> dict:
    lab = {"namespace": NS, "pod": POD, "endpoint": "http", "job": f"{NS}/demo-colossal-rlhf", "model_name": MODEL,
           **labels}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(lab.items()))
    return {"series": f"{metric}{{{inner}}}", "values": values}


def _buckets(observed_le: str, per_min: int) -> list[dict]:
    """A TTFT histogram whose every observation falls in the bucket ending at ``observed_le``."""
    out = []
    for le in ("0.5", "2.5", "5.0", "+Inf"):
        hit = float(le) >= float(observed_le) if le != "+Inf" else True
        out.append(_series("vllm:time_to_first_token_seconds_bucket", f"0+{per_min if hit else 0}x30", le=le))
    return out


def _alert_tests(alerts: dict[str, dict]) -> list[dict]:
    up_labels = {"namespace": NS, "pod": POD, "endpoint": "http", "job": f"{NS}/demo-colossal-rlhf",
                 "instance": "10.0.3.7:8000"}
    up = lambda v, **kw: {"series": "up{" + ",".join(f'{k}="{x}"' for k, x in sorted({**up_labels, **kw}.items()))
                          + "}", "values": v}  # noqa: E731
    fired = lambda name, labels=None, **ann: [{"exp_labels": {"severity": alerts[name]["labels"]["severity"],
                                                              **(labels or {})},
                                               "exp_annotations": ann}]  # noqa: E731
    desc = {n: a["annotations"]["description"] for n, a in alerts.items()}
    return [
        {"name": "5xx share above the threshold fires with the measured share",  # 2 of 12 requests a minute fail
         "interval": "1m",
         "input_series": [_series("vllm:http_requests_total", "0+10x30", status_code="200", endpoint_name="chat"),
                          _series("vllm:http_requests_total", "0+2x30", status_code="503", endpoint_name="chat"),
                          up("1x30")],
         "alert_rule_test": [{"eval_time": "4m", "alertname": "LLMHighErrorRate", "exp_alerts": []},  # `for` 5m
                             {"eval_time": "15m", "alertname": "LLMHighErrorRate", "exp_alerts": fired(
                                 "LLMHighErrorRate",
                                 summary="demo: 16.67% of API requests fail (threshold 5%)",
                                 description=desc["LLMHighErrorRate"].replace(
                                     "{{ $value | humanizePercentage }}", "16.67%"))}]},
        {"name": "4xx and no 5xx stays quiet", "interval": "1m",
         "input_series": [_series("vllm:http_requests_total", "0+10x30", status_code="200", endpoint_name="chat"),
                          _series("vllm:http_requests_total", "0+9x30", status_code="429", endpoint_name="chat"),
                          up("1x30")],
         "alert_rule_test": [{"eval_time": "15m", "alertname": "LLMHighErrorRate", "exp_alerts": []}]},
        {"name": "slow first tokens fire with the p95", "interval": "1m", "input_series": _buckets("5.0", 10),
         "alert_rule_test": [{"eval_time": "15m", "alertname": "LLMTimeToFirstTokenP95High",
                              "exp_alerts": fired("LLMTimeToFirstTokenP95High",
                                                  summary="demo: p95 time to first token is 4.875s (threshold 2s)",
                                                  description="p95 TTFT is 4.875s; add replicas or lower "
                                                              "serving.maxNumSeqs.")}]},
        {"name": "fast first tokens stay quiet", "interval": "1m", "input_series": _buckets("0.5", 10),
         "alert_rule_test": [{"eval_time": "15m", "alertname": "LLMTimeToFirstTokenP95High", "exp_alerts": []}]},
        {"name": "full queues fire", "interval": "1m",  # 60 waiting of maxWaiting 64
         "input_series": [_series("vllm:num_requests_waiting", "60x30")],
         "alert_rule_test": [{"eval_time": "15m", "alertname": "LLMQueueSaturated", "exp_alerts": fired(
             "LLMQueueSaturated", summary="demo: request queues 93.75% full (threshold 80%)",
             description=desc["LLMQueueSaturated"].replace("{{ $value | humanizePercentage }}", "93.75%"))}]},
        {"name": "short queues stay quiet", "interval": "1m",
         "input_series": [_series("vllm:num_requests_waiting", "10x30")],
         "alert_rule_test": [{"eval_time": "15m", "alertname": "LLMQueueSaturated", "exp_alerts": []}]},
        {"name": "a replica that stops answering fires; Ray's own metrics endpoint does not count", "interval": "1m",
         "input_series": [up("1x5 0x20"), up("0x30", endpoint="ray-metrics", instance="10.0.3.7:8080"),
                          up("1x30", pod=POD.replace("x2k4q", "b7m1z"), instance="10.0.3.8:8000")],
         "alert_rule_test": [
             {"eval_time": "4m", "alertname": "LLMReplicaDown", "exp_alerts": []},
             {"eval_time": "10m", "alertname": "LLMReplicaDown", "exp_alerts": fired(
                 "LLMReplicaDown", up_labels, summary=f"demo: serving replica {POD} is down",
                 description=f"Prometheus cannot scrape {POD} (10.0.3.7:8000).")},
             {"eval_time": "20m", "alertname": "LLMServingAbsent", "exp_alerts": []}]},
        {"name": "no replica at all fires absent; an answering one keeps it quiet", "interval": "1m",
         "input_series": [up("0x30")],
         "alert_rule_test": [{"eval_time": "5m", "alertname": "LLMServingAbsent", "exp_alerts": []},
                             {"eval_time": "15m", "alertname": "LLMServingAbsent", "exp_alerts": fired(
                                 "LLMServingAbsent", summary=alerts["LLMServingAbsent"]["annotations"]["summary"],
                                 description=alerts["LLMServingAbsent"]["annotations"]["description"])}]},
    ]


def test_promtool_checks_the_rules_and_every_alert_fires_and_stays_quiet(tmp_path: Path) -> None:
    promtool = _tool("promtool")
    groups, alerts = _rules(VALUES)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(alerts)} rules found" in check.stdout
    tests = _alert_tests(alerts)
    assert {t["alertname"] for case in tests for t in case["alert_rule_test"]} == set(alerts), "every alert tested"
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": tests}, sort_keys=False))
    run = subprocess.run([promtool, "test", "rules", str(tmp_path / "tests.yaml")], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    # and the test can fail: an alert that does not fire where the test says it does is reported
    broken = [dict(tests[3], alert_rule_test=[dict(tests[2]["alert_rule_test"][0])])]
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "tests": broken}))
    bad = subprocess.run([promtool, "test", "rules", str(tmp_path / "broken.yaml")], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert bad.returncode == 1 and "LLMTimeToFirstTokenP95High" in bad.stdout + bad.stderr


# ----------------------------------------------------------------------------- a live Prometheus


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def _post(url: str, body: dict, timeout: float = 120) -> int:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _abort_stream(base: str) -> None:
    """A streamed chat completion the client hangs up on after its first chunk (the server counts a 499, abort)."""
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": 200, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "count to a thousand"}]}).encode()
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        buf = b""
        while b"data:" not in buf:
            chunk = s.recv(4096)
            assert chunk, "the stream ended before its first chunk"
            buf += chunk


def _promql(prom: str, expr: str) -> list[dict]:
    status, body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    out = json.loads(body or b"{}")
    assert status == 200 and out.get("status") == "success", f"{expr}: {status} {body[:500]!r}"
    return out["data"]["result"]


def _alert_operand(expr: str) -> str:
    """An alert's expression without its threshold (``X > 0.05`` -> ``X``; ``absent(X)`` -> ``X``)."""
    expr = " ".join(expr.split())
    inner = re.fullmatch(r"absent\((.*)\)", expr)
    if inner:
        return inner.group(1)
    return re.sub(r"\s*(>|<|==|!=)\s*[0-9.e+-]+$", "", expr)


@pytest.fixture(scope="module")
def live(tmp_path_factory, request) -> dict[str, Any]:
    """The server as the serving pod runs it (`python -m serving --config`), and a Prometheus scraping it."""
    prometheus = _tool("prometheus")
    pytest.importorskip("ray")
    tiny = request.getfixturevalue("tiny_model")
    tmp = tmp_path_factory.mktemp("monitoring")
    port, ray_metrics, prom_port = free_port(), free_port(), free_port()
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model": str(tiny), "served_model_name": MODEL, "host": "127.0.0.1", "port": port,
                                   "ray_metrics_export_port": ray_metrics,
                                   "engine": {"device": "cpu", "max_model_len": 256, "max_num_seqs": 4,
                                              "max_waiting": 8, "cpu_kv_cache_gb": 0.05},
                                   "deployment": {"num_replicas": 1, "num_gpus": 0, "num_cpus": 1,
                                                  "max_ongoing_requests": 32}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
           # a slow 2-core box: Ray Serve's proxy gets more than its default 5 s to report ready
           "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
           "SERVING_TEST_STEP_DELAY_S": "0.02"}
    log = (tmp / "server.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "serving", "--config", str(cfg)], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # the labels prometheus-operator's PodMonitor gives each endpoint of a serving pod
    pod_labels = {"namespace": NS, "pod": POD, "container": "serving"}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yaml"],
        "scrape_configs": [
            {"job_name": f"{NS}/demo-colossal-rlhf", "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {**pod_labels, "endpoint": "http"}},
                {"targets": [f"127.0.0.1:{ray_metrics}"], "labels": {**pod_labels, "endpoint": "ray-metrics"}}]}]}))
    (tmp / "rules.yaml").write_text(yaml.safe_dump({"groups": _rules(VALUES)[0]}))
    prom = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"),
                            start_new_session=True)
    base, prom_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    try:
        deadline = time.monotonic() + 400
        early_503 = 0
        while _get(f"{base}/ready")[0] != 200:
            assert server.poll() is None, (tmp / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "server never became ready: " + (tmp / "server.log").read_text()[-4000:]
            if _get(f"{base}/health")[0] == 200 and not early_503:  # the app is up, the model still loading
                early_503 = _post(f"{base}/v1/chat/completions", {"model": MODEL, "messages": [
                    {"role": "user", "content": "hi"}]})
            time.sleep(0.5)
        yield {"base": base, "prom": prom_url, "early": early_503, "tmp": tmp}
    finally:
        for proc in (prom, server):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_live_prometheus_returns_data_for_every_dashboard_query_and_alert_expression(live) -> None:
    base, prom = live["base"], live["prom"]
    chat = lambda **kw: _post(f"{base}/v1/chat/completions",  # noqa: E731
                              {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], **kw})
    for _ in range(4):
        assert chat(max_tokens=8, temperature=0) == 200
    assert chat(model="no-such-model") == 404
    assert chat(max_tokens=-1) == 400
    _abort_stream(base)
    # every counter has moved; wait until Prometheus has scraped it all (1 s scrapes). An aborted stream shows as
    # finished_reason="abort" (serving/app.py counts no http_requests_total status for a request cancelled mid-way)
    deadline = time.monotonic() + 60
    while True:
        codes = {r["metric"]["status_code"] for r in _promql(prom, 'sum by (status_code) (vllm:http_requests_total)')}
        aborted = _promql(prom, 'vllm:request_success_total{finished_reason="abort"} > 0')
        if {"200", "400", "404"} <= codes and aborted:
            break
        assert time.monotonic() < deadline, f"status codes seen by Prometheus: {codes}, aborted: {aborted}"
        time.sleep(1)
    if live["early"]:
        assert live["early"] == 503 and "503" in codes, "the request sent while loading is a 5xx series"
    time.sleep(3)  # a few more scrapes, so rate() over the panels' window has two samples after the traffic

    dash = json.loads((CHART / "files" / "dashboard.json").read_text())
    empty = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$namespace", NS).replace("$model", ".*").replace("$__rate_interval", "1m")
            result = _promql(prom, expr)
            if not result:
                empty.append(f"{panel['title']}: {target['expr']}")
            for label in re.findall(r"\bby \((\w+)\)", expr.replace("by (le)", "")):
                # a group-by label the server does not export gives one unlabelled series
                assert all(label in r["metric"] for r in result), f"{panel['title']}: no {label!r} label"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":  # label_values(METRIC{...}, LABEL): Grafana's call is /api/v1/series
            metric, label = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"]).groups()
            _, body = _get(f"{prom}/api/v1/series?" + urllib.parse.urlencode(
                {"match[]": metric.replace("$namespace", NS)}))
            values = {s.get(label) for s in json.loads(body)["data"]}
            assert values == {NS if label == "namespace" else MODEL}, (var["name"], values)
    _, alerts = _rules(VALUES)
    for name, rule in alerts.items():
        if not _promql(prom, _alert_operand(rule["expr"])):
            empty.append(f"alert {name}: {_alert_operand(rule['expr'])}")
    assert not empty, "queries that return nothing:\n" + "\n".join(empty)
    # Prometheus itself evaluates the chart's rules without errors, and none fires on a healthy server
    _, body = _get(f"{prom}/api/v1/rules")
    rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
    assert len(rules) == len(alerts) and all(r["health"] == "ok" for r in rules), rules
    assert [r["name"] for r in rules if r["state"] == "firing"] == []
