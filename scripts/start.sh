#!/usr/bin/env bash
# `npm start`: set up (once), then talk to the assistant from this terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -d .tools/node_modules/.bin ] && export PATH="$PWD/.tools/node_modules/.bin:$PATH"
exec bun nanoclaw.ts chat "$@"
