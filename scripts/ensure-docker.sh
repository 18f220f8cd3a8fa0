#!/usr/bin/env bash
# Makes sure a Docker engine answers and the base image exists, for the end-to-end tests.
#  - engine: uses a running one; on a Debian/Ubuntu machine where we are root, installs
#    docker.io when needed and starts dockerd in the background (no systemd required);
#  - base image debian:bookworm-slim: pulled when a registry is reachable, otherwise
#    bootstrapped from Debian's packages with debootstrap and imported.
# A second run on the same machine reuses the engine, the base image and the layer cache.
set -euo pipefail
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
RUNTIME=${CONTAINER_RUNTIME:-docker}
BASE_IMAGE=debian:bookworm-slim

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {
  [ -n "${APT_UPDATED:-}" ] || { as_root apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

if ! "$RUNTIME" info >/dev/null 2>&1; then
  if [ "$RUNTIME" != docker ] || ! command -v apt-get >/dev/null; then
    echo "The container engine ($RUNTIME) is not running and this script cannot start it here." >&2
    echo "Start Docker (Docker Desktop on macOS, 'sudo systemctl start docker' on Linux) and run again." >&2
    exit 1
  fi
  if ! command -v dockerd >/dev/null; then
    step "Installing the Docker engine (docker.io)"
    apt_install docker.io
  fi
  # An engine that died leaves pid files behind; once its pid is reused, dockerd waits for a
  # containerd that is not there ("timeout waiting for containerd to start"). Drop stale ones.
  for pidfile in /var/run/docker.pid /var/run/docker/containerd/containerd.pid; do
    [ -f "$pidfile" ] || continue
    owner=$(cat "/proc/$(cat "$pidfile" 2>/dev/null)/comm" 2>/dev/null || true)
    case "$owner" in dockerd | containerd) ;; *) as_root rm -f "$pidfile" ;; esac
  done
  step "Starting dockerd in the background (log: /tmp/nanoclaw-dockerd.log)"
  as_root sh -c 'nohup dockerd >/tmp/nanoclaw-dockerd.log 2>&1 &'
  for _ in $(seq 1 60); do "$RUNTIME" info >/dev/null 2>&1 && break; sleep 1; done
  "$RUNTIME" info >/dev/null 2>&1 || { echo "dockerd did not come up; see /tmp/nanoclaw-dockerd.log" >&2; exit 1; }
fi
step "Docker engine $("$RUNTIME" version --format '{{.Server.Version}}' 2>/dev/null || echo ready)"

if ! "$RUNTIME" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  step "Getting $BASE_IMAGE"
  if ! timeout 60 "$RUNTIME" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    step "No image registry reachable: bootstrapping $BASE_IMAGE from Debian packages (about 30 s)"
    command -v debootstrap >/dev/null || apt_install debootstrap
    rootfs=$(mktemp -d)
    as_root debootstrap --variant=minbase bookworm "$rootfs" >/tmp/nanoclaw-debootstrap.log 2>&1 \
      || { echo "debootstrap failed; see /tmp/nanoclaw-debootstrap.log" >&2; exit 1; }
    as_root tar -C "$rootfs" -c . | "$RUNTIME" import - "$BASE_IMAGE" >/dev/null
    as_root rm -rf "$rootfs"
  fi
fi
step "Base image $BASE_IMAGE present"
