#!/usr/bin/env bash
# Builds the NanoClaw agent image.
#
#   ./container/build.sh              nanoclaw-agent:latest, with the real Kimi CLI
#   ./container/build.sh --test       nanoclaw-agent:test, with the kimi wire-protocol stub
#   ./container/build.sh --no-cache   rebuild every layer (combine with --test if wanted)
#
# BUILD_CA_CERT=/path/ca.pem adds a CA for the build (behind a TLS-inspecting proxy).
# Uses $CONTAINER_RUNTIME (default docker). Works from any directory.
set -euo pipefail
cd "$(dirname "$0")"
RUNTIME=${CONTAINER_RUNTIME:-docker}
TAG=nanoclaw-agent:latest
KIMI_CLI=real
EXTRA=()
for arg in "$@"; do
  case $arg in
    --test) TAG=nanoclaw-agent:test; KIMI_CLI=stub ;;
    --no-cache) EXTRA+=(--no-cache) ;;
    -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "Unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

if ! command -v "$RUNTIME" >/dev/null 2>&1; then
  echo "'$RUNTIME' is not installed. Install Docker (Docker Desktop on macOS, 'sudo apt-get install docker.io' on Linux)." >&2
  exit 1
fi
if ! "$RUNTIME" info >/dev/null 2>&1; then
  echo "The $RUNTIME engine is not running. Start Docker Desktop (macOS) or 'sudo systemctl start docker' (Linux)." >&2
  exit 1
fi

# A proxy's CA for the build, when there is one (e.g. a company network).
rm -f .build-ca.crt
if [ -n "${BUILD_CA_CERT:-}" ]; then
  [ -f "$BUILD_CA_CERT" ] || { echo "BUILD_CA_CERT=$BUILD_CA_CERT is not a file" >&2; exit 1; }
  cp "$BUILD_CA_CERT" .build-ca.crt
  trap 'rm -f .build-ca.crt' EXIT
fi

echo "==> Building $TAG (kimi: $KIMI_CLI) with $RUNTIME"
started=$(date +%s)
"$RUNTIME" build ${EXTRA[@]+"${EXTRA[@]}"} --build-arg KIMI_CLI="$KIMI_CLI" -t "$TAG" .
echo "==> Built $TAG in $(( $(date +%s) - started )) s"
cat <<MSG

Try it:
  echo '{"prompt":"What is 2+2?","groupFolder":"test","chatJid":"test@g.us","isMain":false,"secrets":{"KIMI_API_KEY":"…"}}' \\
    | $RUNTIME run -i --rm $TAG
  scripts/container.sh kimi      # kimi --version and kimi info inside the image
  scripts/diagnose.sh            # the whole setup
MSG
