#!/usr/bin/env bash
# Installs what NanoClaw needs to run from this checkout: Bun (from the npm registry,
# when it is missing) and the JavaScript dependencies of the host and the agent-runner.
# Safe to run again: it only does what is not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."

BUN_VERSION=1.4.5
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if ! command -v bun >/dev/null 2>&1; then
  step "Installing Bun $BUN_VERSION from the npm registry"
  if ! npm install -g "bun@$BUN_VERSION" >/dev/null 2>&1; then
    # No permission for a global install: keep Bun inside the project instead.
    npm install --no-save --prefix .tools "bun@$BUN_VERSION" >/dev/null
    export PATH="$PWD/.tools/node_modules/.bin:$PATH"
  fi
fi
step "Bun $(bun --version)"

step "Installing dependencies"
bun install --frozen-lockfile
if [ -f container/agent-runner/package.json ]; then
  (cd container/agent-runner && bun install --frozen-lockfile)
fi

if [ ! -f .env ]; then
  cp .env.example .env
  step "Created .env from .env.example: put your KIMI_API_KEY in it"
fi
