#!/usr/bin/env bash
# `npm test` (and CI): installs everything the tests need, then type-checks and runs them all.
# The end-to-end tests use a real Docker engine and the test image built from
# container/Dockerfile (scripts/test-image.sh prepares both, and Bun).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

bash scripts/test-image.sh
[ -d .tools/node_modules/.bin ] && export PATH="$PWD/.tools/node_modules/.bin:$PATH"

if ! command -v sqlite3 >/dev/null; then
  step "Installing sqlite3 (the guide's recipes use it; so do the tests)"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlite3 >/dev/null
  else
    echo "Install sqlite3 (e.g. 'brew install sqlite' or 'sudo apt-get install sqlite3') and run again." >&2
    exit 1
  fi
fi

step "Type-checking"
bunx tsc --noEmit
if [ -f container/agent-runner/tsconfig.json ]; then (cd container/agent-runner && bunx tsc --noEmit); fi

step "Formatting and lint (Biome; 'npx biome check --write .' fixes what it can)"
bunx biome check .

step "Running the tests"
results=$(mktemp)
status=0
bun --bun vitest run --reporter=default --reporter=json --outputFile="$results" || status=$?
# One plain summary line that any CI log reader understands.
bun -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  console.log(`tests: ${r.numPassedTests} passed, ${r.numFailedTests} failed` + (r.numPendingTests ? `, ${r.numPendingTests} skipped` : ""));
' "$results" || true
rm -f "$results"
exit "$status"
