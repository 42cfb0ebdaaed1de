"""Both images built for real and run, with podman mount + chroot standing in for a container runtime.

docker/build-cpu.sh builds each Dockerfile's CPU variant with Debian's `podman build --isolation chroot` on a Debian
base made offline (debootstrap, `podman import`; no registry serves base images here). `podman run` is refused on
the CPU machine (crun cannot set RLIMIT_NPROC), so each image's own command runs from its root folder under chroot
(tests/podman_root.py): the serving image answers a chat completion on the tiny model; the training image prints a
stage's help and trains and exports one SFT step. From nothing cached this module took 6 min 54 s on the 2-core
machine, 4 min 18 s with the base and layers cached under .cache/images (README "Images built here").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from podman_root import ROOT, SERVE_IMAGE, TRAIN_IMAGE, image_root, stop
from serve_app import free_port

# the first build of both images (debootstrap included) outlasts the suite's 900 s default
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
BUILD_TIMEOUT_S = 2100
NEEDS_DISK = 16 * 2**30  # measured: 8.6 GB of cache and podman storage after a cold build, twice that as margin


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> None:
    """Both CPU images, built (or brought up to date from podman's layer cache) by docker/build-cpu.sh."""
    if os.geteuid() != 0:
        pytest.skip("podman's storage, chroot and unshare need root (`make images-test` runs them with sudo)")
    free = shutil.disk_usage(ROOT).free
    if free < NEEDS_DISK:  # a cold build leaves ~8.6 GB under .cache/images; a full disk would fail every test after
        pytest.skip(f"{free / 2**30:.1f} GiB free under {ROOT}, the image builds need {NEEDS_DISK / 2**30:.0f} GiB")
    if shutil.which("podman") is None or shutil.which("debootstrap") is None:
        pytest.fail("podman/debootstrap missing: `make podman` installs them (make test does)")
    log = tmp_path_factory.mktemp("images") / "build.log"
    with open(log, "w") as out:
        r = subprocess.run([str(ROOT / "docker" / "build-cpu.sh"), "all"], stdout=out, stderr=subprocess.STDOUT,
                           timeout=BUILD_TIMEOUT_S)
    text = log.read_text(errors="replace")
    assert r.returncode == 0, f"docker/build-cpu.sh exited {r.returncode}:\n{text[-8000:]}"
    print("\n".join(ln for ln in text.splitlines() if ln.startswith("[images]")))


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


def test_serving_image_answers_a_chat_completion_with_podman_chroot_standing_in_for_a_runtime(
        images: None, tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    with image_root(SERVE_IMAGE) as root:
        # the image's own CMD reads /etc/colossal-rlhf/serve/serve.yaml, where the chart mounts its ConfigMap
        cmd = root.cmd
        assert cmd[:3] == ["python", "-m", "serving"] and cmd[-1] == "/etc/colossal-rlhf/serve/serve.yaml", cmd
        shutil.copytree(tiny_model, root.host("/home/ray/model"))
        root.chown("/home/ray/model")
        root.put(cmd[-1], yaml.safe_dump({
            "model": "/home/ray/model", "served_model_name": "tiny-chat", "host": "127.0.0.1", "port": port,
            "ray_metrics_export_port": free_port(),
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


def test_training_image_runs_stage_help_and_one_sft_step_with_podman_chroot_standing_in_for_a_runtime(
        images: None, tiny_model: Path, tmp_path: Path) -> None:
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
