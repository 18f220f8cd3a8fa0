#!/usr/bin/env bash
# `npm run bench`: sets up what the benchmarks need (Bun, dependencies, a Docker engine, the
# test image nanoclaw-agent:test), then prints the table (bench/run.ts; its flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

bash scripts/setup.sh >&2
[ -d .tools/node_modules/.bin ] && export PATH="$PWD/.tools/node_modules/.bin:$PATH"
bash scripts/ensure-docker.sh >&2
# The image build needs the CA of a TLS-inspecting proxy, if there is one (as in scripts/test.sh).
for ca in "${BUILD_CA_CERT:-}" "${NODE_EXTRA_CA_CERTS:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
  if [ -n "$ca" ] && [ -f "$ca" ]; then export BUILD_CA_CERT=$ca; break; fi
done
if [ "${1:-}" != --help ] && [ "${1:-}" != -h ]; then
  step "Building the test image nanoclaw-agent:test"
  ./container/build.sh --test >&2
fi
exec bun bench/run.ts "$@"
