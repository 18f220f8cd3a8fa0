#!/usr/bin/env bash
# Builds the NanoClaw agent image (./container/build.sh --help for the options).
#
# Behind a TLS-inspecting proxy the build needs the proxy's CA. It is taken from the same
# variables `npm test` uses, the first one that is set: BUILD_CA_CERT, NODE_EXTRA_CA_CERTS,
# SSL_CERT_FILE. With none set, no extra CA is added (none is needed without a proxy).
# Uses $CONTAINER_RUNTIME (default docker). Works from any directory.
set -euo pipefail
cd "$(dirname "$0")"
RUNTIME=${CONTAINER_RUNTIME:-docker}

usage() {
  cat <<'USAGE'
Usage: ./container/build.sh [--test] [--no-cache] [--tag NAME[:TAG]]

  (no option)            nanoclaw-agent:latest
  --test                 nanoclaw-agent:test, the tag the tests use (the same image)
  --no-cache             rebuild every layer (combines with the other options)
  -t, --tag NAME[:TAG]   build under this name instead, e.g. --tag my-agent:dev
                         (then set CONTAINER_IMAGE=my-agent:dev in .env)
  -h, --help             this text

CA for a TLS-inspecting proxy: BUILD_CA_CERT, else NODE_EXTRA_CA_CERTS, else SSL_CERT_FILE.
Engine: $CONTAINER_RUNTIME (default docker).
USAGE
}
bad_usage() { echo "build.sh: $1" >&2; usage >&2; exit 2; }

# An image reference docker accepts: [registry[:port]/]name[/name…][:tag], names in lower case.
valid_tag() {
  local component='[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*'
  local label='[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?'
  local registry="(localhost(:[0-9]+)?|$label(\\.$label)+(:[0-9]+)?|$label:[0-9]+)/"
  [ ${#1} -le 255 ] && [[ $1 =~ ^($registry)?$component(/$component)*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$ ]]
}

TAG=nanoclaw-agent:latest
CUSTOM_TAG="" TAG_GIVEN=0
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --test) TAG=nanoclaw-agent:test ;;
    --no-cache) EXTRA+=(--no-cache) ;;
    -t|--tag)
      [ $# -ge 2 ] || bad_usage "$1 needs an image name, e.g. $1 nanoclaw-agent:dev"
      CUSTOM_TAG=$2 TAG_GIVEN=1; shift ;;
    --tag=*) CUSTOM_TAG=${1#--tag=} TAG_GIVEN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown option '$1'" ;;
  esac
  shift
done
if [ $TAG_GIVEN = 1 ]; then
  valid_tag "$CUSTOM_TAG" || bad_usage "'$CUSTOM_TAG' is not a valid image name (lower-case name[:tag], e.g. nanoclaw-agent:dev)"
  TAG=$CUSTOM_TAG
fi

if ! command -v "$RUNTIME" >/dev/null 2>&1; then
  echo "'$RUNTIME' is not installed. Install Docker (Docker Desktop on macOS, 'sudo apt-get install docker.io' on Linux)." >&2
  exit 1
fi
if ! "$RUNTIME" info >/dev/null 2>&1; then
  echo "The $RUNTIME engine is not running. Start Docker Desktop (macOS) or 'sudo systemctl start docker' (Linux)." >&2
  exit 1
fi

# A proxy's CA for the build, when there is one (e.g. a company network): the first of
# BUILD_CA_CERT, NODE_EXTRA_CA_CERTS, SSL_CERT_FILE that is set. BUILD_CA_CERT is asked for
# by name, so it must be a file; the other two are skipped (with a note) when they are not.
rm -f .build-ca.crt
LOG=$(mktemp "${TMPDIR:-/tmp}/nanoclaw-build.XXXXXX")
trap 'rm -f .build-ca.crt "$LOG"' EXIT
CA="" CA_FROM=""
if [ -n "${BUILD_CA_CERT:-}" ]; then
  [ -f "$BUILD_CA_CERT" ] || { echo "BUILD_CA_CERT=$BUILD_CA_CERT is not a file" >&2; exit 1; }
  CA=$BUILD_CA_CERT CA_FROM=BUILD_CA_CERT
else
  for var in NODE_EXTRA_CA_CERTS SSL_CERT_FILE; do
    value=${!var:-}
    [ -n "$value" ] || continue
    if [ -f "$value" ]; then CA=$value CA_FROM=$var; break; fi
    echo "==> $var=$value is not a file; not using it for the build"
  done
fi
if [ -n "$CA" ]; then
  cp "$CA" .build-ca.crt
  echo "==> CA for the build: $CA (from $CA_FROM)"
else
  echo "==> No extra CA for the build (behind a TLS-inspecting proxy: BUILD_CA_CERT=/path/ca.pem)"
fi

echo "==> Building $TAG with $RUNTIME"
started=$(date +%s)
status=0
"$RUNTIME" build ${EXTRA[@]+"${EXTRA[@]}"} -t "$TAG" . 2>&1 | tee "$LOG" || status=$?
if [ $status != 0 ]; then
  # Bun and the Kimi Code CLI come from the npm registry: when the Dockerfile says that is
  # what failed, say so in one line with the fix. (Not preceded by a quote: the build log
  # also shows each step's command, with its `echo "no network…"` in it.)
  if grep -Eq '(^|[^"])no network to install (the Kimi CLI|Bun)' "$LOG"; then
    echo "==> Build of $TAG failed: no network to install the Kimi CLI (the npm registry, https://registry.npmjs.org, where it and Bun come from, could not be reached)." >&2
    echo "    Behind a proxy: set BUILD_CA_CERT=/path/to/proxy-ca.pem (or NODE_EXTRA_CA_CERTS) and build again." >&2
  else
    echo "==> Build of $TAG failed (exit $status); the build output above says which step." >&2
  fi
  exit "$status"
fi
echo "==> Built $TAG in $(( $(date +%s) - started )) s"
cat <<MSG

Try it:
  echo '{"prompt":"What is 2+2?","groupFolder":"test","chatJid":"test@g.us","isMain":false,"secrets":{"KIMI_API_KEY":"…"}}' \\
    | $RUNTIME run -i --rm $TAG
  scripts/container.sh kimi      # the Kimi Code CLI inside the image
  scripts/diagnose.sh            # the whole setup
MSG
if [ "$TAG" != nanoclaw-agent:latest ] && [ "$TAG" != nanoclaw-agent:test ]; then
  echo "  NanoClaw uses nanoclaw-agent:latest unless .env says CONTAINER_IMAGE=$TAG"
fi
