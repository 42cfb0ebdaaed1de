"""Run what an image holds without a container runtime: podman's storage gives a writable root, chroot runs it.

`podman run` is refused on the CPU machine (crun cannot set RLIMIT_NPROC), so a container is created, never
started: `podman create` + `podman mount` give its root folder (the image plus a writable layer), and the
image's own command runs there under chroot, as the image's user, in its working folder, with its environment.
/proc, /dev and /sys are mounted in a private mount namespace (`unshare --mount`), so they vanish with the
process, whatever happens to it; the container is unmounted and removed afterwards.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("IMAGES_CACHE", ROOT / ".cache" / "images"))
TRAIN_IMAGE = os.environ.get("TRAIN_IMAGE", "localhost/colossal-rlhf-train:cpu")
SERVE_IMAGE = os.environ.get("SERVE_IMAGE", "localhost/colossal-rlhf-serve:cpu")


def podman(*args: str, timeout: float = 120) -> str:
    """podman on the build script's own storage (docker/build-cpu.sh), never the host's default one."""
    cmd = ["podman", "--root", str(CACHE / "storage"), "--runroot", str(CACHE / "run"), "--storage-driver",
           "overlay", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout.strip()


class Root:
    """A created (never started) container's root folder, and the image config it came from."""

    def __init__(self, path: Path, config: dict) -> None:
        self.path = path
        self.config = config
        self.env = dict(e.split("=", 1) for e in config.get("Env") or [])
        self.user = config.get("User") or "0:0"
        self.workdir = config.get("WorkingDir") or "/"
        self.cmd: list[str] = config.get("Cmd") or []
        # buildah records WORKDIR without creating it when no later step writes there; runtimes create it at start
        self.host(self.workdir).mkdir(parents=True, exist_ok=True)

    def host(self, inside: str) -> Path:
        """Where a path inside the image lies on this machine."""
        return self.path / inside.lstrip("/")

    def put(self, inside: str, data: bytes | str) -> None:
        """Write a file inside the image, owned by the image's user (its writable layer; gone with the container)."""
        target = self.host(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.encode() if isinstance(data, str) else data)
        self.chown(inside)

    def chown(self, inside: str) -> None:
        uid, gid = (int(x) for x in (self.user.split(":") + ["0"])[:2])
        top = self.host(inside)
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            os.chown(p, uid, gid)

    def popen(self, argv: list[str], *, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        """`argv` run inside the root as the image runs it: its user, working folder and environment."""
        full_env = {**self.env, "HOME": _home(self), **(env or {})}
        inner = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in full_env.items()), "/bin/sh", "-c",
                 'cd "$0" && exec "$@"', self.workdir, *argv]
        script = ('r=$0 u=$1 && shift && mount -t proc proc "$r/proc" && mount --rbind /dev "$r/dev" '
                  '&& mount --rbind /sys "$r/sys" && exec chroot --userspec="$u" "$r" "$@"')
        cmd = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, str(self.path), self.user,
               *inner]
        with open(log, "ab") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, argv: list[str], *, log: Path, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        proc = self.popen(argv, log=log, env=env)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            raise AssertionError(f"{argv} ran past {timeout} s:\n{log.read_text(errors='replace')[-4000:]}") from None
        return rc, log.read_text(errors="replace")

    def processes(self) -> list[int]:
        """Processes whose root is this folder (what the image ran, and anything it left behind)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.readlink(d / "root") == str(self.path):
                        out.append(int(d.name))
                except OSError:
                    continue
        return out


def _home(root: Root) -> str:
    uid = root.user.split(":")[0]
    for line in root.host("/etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[2] == uid or fields[0] == uid:
            return fields[5]
    return "/tmp"


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 60) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextmanager
def image_root(image: str) -> Iterator[Root]:
    """A container of ``image`` created and mounted (not started); removed, with whatever ran in it, after."""
    config = json.loads(podman("image", "inspect", image))[0]["Config"]
    cid = podman("create", image)
    try:
        root = Root(Path(podman("mount", cid)), config)
        try:
            yield root
        finally:
            for pid in root.processes():  # Ray's daemons can outlive the server by a moment
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in range(50):
                if not root.processes():
                    break
                time.sleep(0.2)
            podman("umount", cid)
    finally:
        podman("rm", "--force", cid)
