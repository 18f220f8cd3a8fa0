#!/usr/bin/env bash
# `npm run bench`: sets up what the benchmarks need (Bun, dependencies, a Docker engine, the
# test image nanoclaw-agent:test: scripts/test-image.sh), then prints the table (bench/run.ts; its flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --help ] || [ "${1:-}" = -h ]; then
  bash scripts/setup.sh >&2
else
  bash scripts/test-image.sh >&2
fi
[ -d .tools/node_modules/.bin ] && export PATH="$PWD/.tools/node_modules/.bin:$PATH"
exec bun bench/run.ts "$@"
