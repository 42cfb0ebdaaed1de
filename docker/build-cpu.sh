#!/usr/bin/env bash
# Builds the CPU variant of both images with Debian's podman (`--isolation chroot`: no Docker engine, no registry).
#   docker/build-cpu.sh [base|train|serve|all|clean]   (root; `make images`; tests/cpu/test_images.py runs `all`)
# The base stands in for the CUDA/Ray bases no registry here serves: Debian 12 made by debootstrap (cached as a
# tarball), imported twice: as is for Dockerfile.train (whose apt steps install Python, as on Ubuntu), and with a
# uid-1000 venv on PATH for Dockerfile.serve (what rayproject/ray gives: `pip`/`python` owned by user 1000).
# torch comes from this machine's CPU wheel through a local index (TORCH_INDEX_URL), pinned by
# docker/constraints-cpu.txt. Images and layers live in their own podman storage under the cache folder, so the
# host's podman storage is never touched and the training image's rebuild reuses every layer whose inputs did not
# change (the serving image is built whole: see build_serve).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${IMAGES_CACHE:-$ROOT/.cache/images}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_TAR=$CACHE/base-$SUITE.tar
TRAIN_BASE=localhost/colossal-rlhf-cpu-base:$SUITE
SERVE_BASE=localhost/colossal-rlhf-cpu-base-ray:$SUITE
TRAIN_IMAGE=${TRAIN_IMAGE:-localhost/colossal-rlhf-train:cpu}
SERVE_IMAGE=${SERVE_IMAGE:-localhost/colossal-rlhf-serve:cpu}
podman() { command podman --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver overlay "$@"; }
stamp() { echo "[images] $(date -u +%T) $*"; }

make_base() {
  [ -f "$BASE_TAR" ] && return
  local dir=$CACHE/base.tmp
  rm -rf "$dir" && mkdir -p "$CACHE"
  stamp "debootstrap $SUITE"
  # debootstrap's own resolver misses some dependencies (python3.11-venv -> python3.11-distutils): apt adds the rest.
  # Python 3.11 (Debian 12's) and g++: the CUDA devel and Ray bases carry a compiler; pypcre builds from its sdist.
  debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$dir" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  # this machine's own CAs (its TLS egress proxy signs PyPI's certificates), as an organisation's base carries its own
  cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/" 2>/dev/null || true
  # a private mount namespace: /proc is unmounted when the chroot's shell exits, whatever happens
  unshare --mount --propagation private /bin/sh -ec 'mount -t proc proc "$1/proc"; exec chroot "$1" /bin/sh -ec "
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ make >/dev/null
    update-ca-certificates >/dev/null
    groupadd --force --gid 100 users
    useradd --uid 1000 --gid 100 --create-home --home-dir /home/ray ray
    python3.11 -m venv /home/ray/venv
    chown -R 1000:100 /home/ray
    apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin"' sh "$dir" >>"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  tar -C "$dir" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR" && rm -rf "$dir"
}

import_bases() {
  # pip's own certificate bundle (certifi) knows no local CA: point it at the system's
  local ca="ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"
  podman image exists "$TRAIN_BASE" || { stamp "import $TRAIN_BASE"; podman import --change "$ca" \
    "$BASE_TAR" "$TRAIN_BASE" >/dev/null; }
  podman image exists "$SERVE_BASE" || { stamp "import $SERVE_BASE"; podman import --change "$ca" \
    --change "ENV PATH=/home/ray/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "USER 1000:100" --change "WORKDIR /home/ray" "$BASE_TAR" "$SERVE_BASE" >/dev/null; }
}

# A PEP 503 index of torch's CPU wheel and its requirements, served on loopback (a chroot build shares the host's
# network); the Dockerfiles install torch from TORCH_INDEX_URL, so the CUDA default stays one build arg away.
start_index() {
  local index=$CACHE/torch-index
  if [ ! -f "$index/.complete" ]; then
    rm -rf "$index" && mkdir -p "$index/files"
    python3 -m pip download -q --dest "$index/files" --requirement "$ROOT/docker/constraints-cpu.txt"
    python3 - "$index" <<'PY'
import pathlib, re, sys
index = pathlib.Path(sys.argv[1])
for f in (index / "files").iterdir():
    name = re.sub(r"[-_.]+", "-", re.split(r"-\d", f.name, maxsplit=1)[0]).lower()
    (index / "simple" / name).mkdir(parents=True, exist_ok=True)
    (index / "simple" / name / f.name).symlink_to(f)
PY
    touch "$index/.complete"
  fi
  # a fixed port: the index URL is a build arg, and a changed build arg misses podman's layer cache for every RUN
  PORT=${IMAGES_INDEX_PORT:-38471}
  python3 -m http.server --bind 127.0.0.1 --directory "$index" "$PORT" >"$CACHE/index.log" 2>&1 &
  INDEX_PID=$!
  trap 'kill "$INDEX_PID" 2>/dev/null || true' EXIT
  local up=
  for _ in $(seq 50); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/simple/torch/', timeout=2)" 2>/dev/null \
      && up=1 && break
    kill -0 "$INDEX_PID" 2>/dev/null || break
    sleep 0.2
  done
  [ -n "$up" ] || { echo "torch index did not start on 127.0.0.1:$PORT (IMAGES_INDEX_PORT):"; cat "$CACHE/index.log"; exit 1; }
  TORCH_INDEX_URL=http://127.0.0.1:$PORT/simple
}

# REVISION stays "unknown": a per-commit label would miss the cache for every RUN of the final stages
podman_build() {  # podman_build DOCKERFILE ARGS...
  local file=$1; shift
  podman build --isolation chroot --format docker --layers -f "$ROOT/$file" --build-arg CUDA=0 \
    --build-arg CONSTRAINTS=docker/constraints-cpu.txt --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" "$@" "$ROOT"
}

build_train() {
  stamp "build $TRAIN_IMAGE"
  local t0=$SECONDS
  local -a args=(--build-arg CUDA_IMAGE="$TRAIN_BASE" --build-arg PYTHON_VERSION=3.11
                 --build-arg GXX_VERSION='4:12.*' --build-arg LIBGOMP_VERSION='12.*')
  # the builder stage tagged too, so pruning what earlier builds left untagged keeps its cached layers
  podman_build docker/Dockerfile.train --target builder -t "$TRAIN_IMAGE-builder" "${args[@]}"
  podman_build docker/Dockerfile.train -t "$TRAIN_IMAGE" "${args[@]}"
  stamp "built $TRAIN_IMAGE in $((SECONDS - t0)) s"
}

build_serve() {
  stamp "build $SERVE_IMAGE"
  local t0=$SECONDS
  # --no-cache: Debian's podman 4.3.1 (buildah 1.28) mounts an empty folder for `RUN --mount=type=bind,from=builder`
  # when the builder stage came from the cache (buildah issue 4375: "/tmp/wheels ... non-existing path"), so this
  # image is built whole every time (159-162 s here)
  podman_build docker/Dockerfile.serve --no-cache -t "$SERVE_IMAGE" --build-arg RAY_IMAGE="$SERVE_BASE"
  stamp "built $SERVE_IMAGE in $((SECONDS - t0)) s"
}

# an interrupted build leaves buildah's working containers (and their mounts): remove them, and dangling layers
clean() {
  local c
  for c in $(podman ps --all --external --quiet); do podman rm --force "$c" >/dev/null; done
  podman image prune --force >/dev/null
}

# all in one function, read whole before it runs (bash reads a script as it goes: an edit mid-build would bite)
main() {
  local what=${1:-all} t0=$SECONDS
  case $what in base|train|serve|all|clean) ;; *) echo "usage: $0 [base|train|serve|all|clean]" >&2; exit 2 ;; esac
  [ "$what" = clean ] && { clean; exit 0; }
  make_base
  stamp "base ready in $((SECONDS - t0)) s"
  import_bases
  case $what in
    base) ;;
    train) start_index; build_train ;;
    serve) start_index; build_serve ;;
    all) start_index; build_train; build_serve
         # what earlier builds left untagged (each about as big as the image): 38 GB after four rebuilds otherwise
         podman image prune --force >/dev/null ;;
  esac
  stamp "done ($what) in $((SECONDS - t0)) s"
}

main "$@"
