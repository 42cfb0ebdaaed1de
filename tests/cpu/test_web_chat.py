"""The chat web page and the terminal chat against the real app: ``python -m serving`` on a tiny random Llama
(CPU, Ray Serve on loopback), the page at ``/`` driven in Debian's headless Chromium through playwright.

Chromium comes from ``make browser`` (apt). Without it the browser tests are skipped, except in CI (``CI`` set),
where a missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from serve_app import free_port

from training.demo import stop_server  # SIGINT for Ray's clean shutdown, then SIGKILL

READY_TIMEOUT_S = 420


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make browser` installs Debian's chromium")
        pytest.skip("chromium not installed (run `make browser`)")
    return path


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT_S) -> None:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"/ready not 200 after {timeout} s:\n{log.read_text(errors='replace')[-6000:]}")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """``python -m serving`` on the tiny model, bound to loopback on free ports; stopped with SIGINT after."""
    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "served_model_name": "tiny-chat", "host": "127.0.0.1", "port": port,
        "ray_metrics_export_port": free_port(),
        "engine": {"device": "cpu", "max_model_len": 256, "max_num_seqs": 4},
        "deployment": {"num_cpus": 1},
    }))
    log = tmp / "serve.log"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": ray_tmp}
    env.pop("API_KEYS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "serving", "--config", str(cfg), "--model", str(tiny_model)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        stop_server(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# Records the assistant bubble's text at every DOM change, so the test can tell a streamed reply
# (text growing over several updates) from one that lands all at once.
OBSERVER = """() => {
  window.__snapshots = [];
  new MutationObserver(() => {
    const bubbles = document.querySelectorAll('.msg.assistant .text');
    if (bubbles.length) window.__snapshots.push(bubbles[bubbles.length - 1].textContent);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def drive_page(url: str, chromium: str) -> dict:
    """Open the page, chat two turns, provoke a server error; returns what was observed."""
    from playwright.sync_api import sync_playwright

    seen: dict = {"requests": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: seen["requests"].append(json.loads(r.post_data))
                    if r.url.endswith("/v1/chat/completions") and r.post_data else None)
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#model').options.length > 0 || "
                                   "document.querySelector('#error').textContent", timeout=60_000)
            error = page.locator("#error").inner_text()
            assert not error, f"the page could not list models: {error}"
            seen["models"] = page.eval_on_selector_all("#model option", "els => els.map(e => e.value)")
            page.fill("#max_tokens", "24")
            page.fill("#temperature", "0")
            page.click("details > summary")  # the key field sits under "more", as a person would open it
            page.fill("#api_key", "sk-session-only")  # keys are off on this server: any key is accepted
            page.evaluate("() => localStorage.setItem('chat.api_key', 'sk-left-by-an-old-page')")
            page.evaluate(OBSERVER)

            page.fill("#input", "Hello there")
            page.press("#input", "Enter")  # Enter sends
            page.wait_for_selector(".msg.assistant", state="attached", timeout=120_000)
            page.wait_for_selector(".msg.assistant .meta", timeout=180_000)  # written when the stream ends
            seen["first_reply"] = page.locator(".msg.assistant .text").first.text_content()
            seen["snapshots"] = page.evaluate("window.__snapshots")
            seen["key_storage"] = page.evaluate("() => ({local: localStorage.getItem('chat.api_key'), "
                                                "session: sessionStorage.getItem('chat.api_key'), "
                                                "local_max_tokens: localStorage.getItem('chat.max_tokens')})")

            page.fill("#input", "And again?")
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.msg.assistant .meta').length == 2", timeout=180_000)
            seen["bubbles"] = page.eval_on_selector_all(".msg", "els => els.map(e => e.dataset.role)")

            # A model the server does not serve: the API's error must reach the user.
            page.evaluate("""() => { const o = document.createElement('option'); o.value = o.textContent = 'nope';
                                     document.querySelector('#model').appendChild(o);
                                     document.querySelector('#model').value = 'nope'; }""")
            page.fill("#input", "Who are you?")
            page.click("#send")
            page.wait_for_selector("#error.show", timeout=60_000)
            seen["error"] = page.locator("#error").inner_text()
            seen["bubbles_after_error"] = page.eval_on_selector_all(".msg", "els => els.map(e => e.dataset.role)")
            seen["send_enabled"] = page.is_enabled("#send")
        finally:
            browser.close()
    return seen


def test_web_page_streams_multi_turn_replies_and_shows_errors(server):
    seen = drive_page(server, _chromium())

    assert seen["models"] == ["tiny-chat"]
    # the key stays in this tab's session only; the other settings persist; an old page's stored key is gone
    assert seen["key_storage"] == {"local": None, "session": "sk-session-only", "local_max_tokens": "24"}
    reply = seen["first_reply"]
    assert reply, "no reply text appeared"
    growing = [s for i, s in enumerate(seen["snapshots"]) if s and (i == 0 or s != seen["snapshots"][i - 1])]
    assert len(growing) >= 2, f"reply did not stream in pieces: {seen['snapshots']}"
    assert all(reply.startswith(s) for s in growing), "snapshots are not prefixes of the final reply"

    first, second = seen["requests"][0], seen["requests"][1]
    assert first["stream"] is True and first["model"] == "tiny-chat" and first["max_tokens"] == 24
    assert first["temperature"] == 0
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]  # history is sent
    assert second["messages"][1]["content"] == reply
    assert seen["bubbles"] == ["user", "assistant", "user", "assistant"]
    assert seen["bubbles_after_error"] == [*seen["bubbles"], "user"]  # the failed reply's empty bubble is removed

    assert seen["error"].startswith("Error 404") and "nope" in seen["error"], seen["error"]
    assert seen["send_enabled"]


def test_terminal_chat_streams_and_keeps_history(server):
    one = subprocess.run([sys.executable, "-m", "serving.chat", "--url", server, "--once", "Hi", "--max-tokens", "8",
                          "--temperature", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.strip()

    script = "Hello\n/history\n/reset\n/history\n/temperature 5\n/quit\n"
    multi = subprocess.run([sys.executable, "-m", "serving.chat", "--url", server, "--max-tokens", "8",
                            "--system", "Be brief."], input=script, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    out = multi.stdout
    assert "[system] Be brief." in out and "[user] Hello" in out and "[assistant] " in out
    after_reset = out.split("(conversation cleared)")[1]
    assert "[user] Hello" not in after_reset and "[system] Be brief." in after_reset
    assert "/temperature must be in [0, 2]" in out


def test_terminal_chat_reports_api_errors(server):
    bad = subprocess.run([sys.executable, "-m", "serving.chat", "--url", server, "--model", "nope", "--once", "Hi"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "error 404" in bad.stderr
    down = subprocess.run([sys.executable, "-m", "serving.chat", "--url", f"http://127.0.0.1:{free_port()}",
                           "--once", "Hi"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert down.returncode == 1 and "cannot reach a server" in down.stderr
