#!/usr/bin/env bash
# What the tests and the benchmarks run on: Bun and the dependencies (scripts/setup.sh), a
# Docker engine and its base image (scripts/ensure-docker.sh), and the test image
# nanoclaw-agent:test built from container/Dockerfile. Used by scripts/test.sh and scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

bash scripts/setup.sh
[ -d .tools/node_modules/.bin ] && export PATH="$PWD/.tools/node_modules/.bin:$PATH"
bash scripts/ensure-docker.sh
# Behind a TLS-inspecting proxy (its CA in NODE_EXTRA_CA_CERTS / SSL_CERT_FILE), the image
# build needs that CA too. The host's own bundle is the fallback: harmless when it holds only the usual CAs.
for ca in "${BUILD_CA_CERT:-}" "${NODE_EXTRA_CA_CERTS:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$ca" ] && [ -f "$ca" ]; then export BUILD_CA_CERT=$ca; break; fi
done
step "Building the test image nanoclaw-agent:test"
./container/build.sh --test
