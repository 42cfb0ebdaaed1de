"""Both images built for real (CPU variant, podman `--isolation chroot`) and run with podman-mount + chroot
standing in for a container runtime (`podman run` is refused on the CPU machine): the serving image's own
command answers a chat completion on the tiny model; the training image's own command prints a stage's help and
one SFT step trains and exports.

`make images-test` builds the images (tests/images/build.sh) and runs this module; without the images the tests
skip, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from rootfs import SERVE_IMAGE, TRAIN_IMAGE, image_exists, image_root, stop

pytestmark = pytest.mark.slow


def _need(image: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("podman's storage, chroot and unshare need root (`make images-test` runs them with sudo)")
    if shutil.which("podman") is None or not image_exists(image):
        pytest.skip(f"{image} not built: `make images-test` builds it (tests/images/build.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def test_serving_image_command_answers_a_chat_completion_under_podman_mount_and_chroot(tiny_model: Path,
                                                                                       tmp_path: Path) -> None:
    _need(SERVE_IMAGE)
    port = _free_port()
    with image_root(SERVE_IMAGE) as root:
        # the image's own CMD reads /etc/colossal-rlhf/serve/serve.yaml, where the chart mounts its ConfigMap
        cmd = root.cmd
        assert cmd[:3] == ["python", "-m", "serving"] and cmd[-1] == "/etc/colossal-rlhf/serve/serve.yaml", cmd
        shutil.copytree(tiny_model, root.host("/home/ray/model"))
        root.chown("/home/ray/model")
        root.put(cmd[-1], yaml.safe_dump({
            "model": "/home/ray/model", "served_model_name": "tiny-chat", "host": "127.0.0.1", "port": port,
            "ray_metrics_export_port": _free_port(),
            "engine": {"device": "cpu", "max_model_len": 256, "max_num_seqs": 2},
            "deployment": {"num_cpus": 1}}))
        log = tmp_path / "serve.log"
        # a slow 2-core box: Ray Serve's proxy gets more than its default 5 s to report ready
        proc = root.popen(cmd, log=log, env={"TOKENIZERS_PARALLELISM": "false", "RAY_TMPDIR": "/tmp/ray",
                                             "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120"})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while _http(f"{url}/ready")[0] != 200:
                assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()[-6000:]}"
                assert time.monotonic() < deadline, f"not ready after 300 s:\n{log.read_text()[-6000:]}"
                time.sleep(1)
            status, body = _http(f"{url}/v1/chat/completions", {
                "model": "tiny-chat", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 8, "temperature": 0})
            assert status == 200, body
            reply = json.loads(body)
            assert reply["object"] == "chat.completion" and reply["model"] == "tiny-chat"
            assert reply["choices"][0]["message"]["role"] == "assistant"
            assert 1 <= reply["usage"]["completion_tokens"] <= 8 and reply["usage"]["prompt_tokens"] > 5
            # the server really runs from the image: its Python is the image's venv, not this machine's
            assert root.processes(), "nothing runs with the image's root"
        finally:
            stop(proc)


SFT_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"instruction": "Add two and two.", "input": "", "output": "Two plus two is four."},
]


def test_training_image_runs_a_stage_help_and_one_sft_step_under_podman_mount_and_chroot(tiny_model: Path,
                                                                                         tmp_path: Path) -> None:
    _need(TRAIN_IMAGE)
    with image_root(TRAIN_IMAGE) as root:
        assert root.cmd == ["python", "-m", "training.sft", "--help"] and root.user.startswith("1000")
        rc, out = root.run(root.cmd, log=tmp_path / "help.log", timeout=300)
        assert rc == 0 and "--config" in out and "--resume" in out, out[-3000:]

        work = root.workdir  # /artifacts: the chart's artifacts volume
        shutil.copytree(tiny_model, root.host(f"{work}/model"))
        root.put(f"{work}/sft.jsonl", "".join(json.dumps(r) + "\n" for r in SFT_ROWS))
        root.put(f"{work}/sft.yaml", yaml.safe_dump({
            "model": {"path": f"{work}/model"},
            "data": {"train": [f"{work}/sft.jsonl"], "max_length": 64, "shuffle": False},
            "train": {"plugin": "ddp", "micro_batch_size": 2, "max_steps": 1, "lr": 1e-3, "warmup_steps": 0},
            "checkpoint": {"output_dir": f"{work}/sft"},
            "log": {"every": 1, "tensorboard": False, "progress": False}}))
        root.chown(work)
        rc, out = root.run(["python", "-m", "training.sft", "--config", f"{work}/sft.yaml"],
                           log=tmp_path / "sft.log", timeout=600, env={"TOKENIZERS_PARALLELISM": "false"})
        assert rc == 0, out[-6000:]
        manifest = json.loads(root.host(f"{work}/sft/manifest.json").read_text())
        assert manifest["stage"] == "sft" and manifest["status"] == "complete", manifest
        metrics = [json.loads(ln) for ln in root.host(f"{work}/sft/metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "loss" in m] == [1] and metrics[0]["loss"] > 0, metrics
