#!/usr/bin/env bash
# `npm run demo`: talk to the assistant in this terminal without a Kimi key. Everything is
# real (the host, Docker, the agent image with Kimi Code CLI, the tools) except the model:
# scripts/scripted-model.ts answers on loopback, every answer labelled "(demo model, not
# Kimi:)". It keeps its own state in data/demo/ (its groups, sessions and database), so
# your real assistant's memory and history are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }

bash scripts/setup.sh
[ -d .tools/node_modules/.bin ] && export PATH="$PWD/.tools/node_modules/.bin:$PATH"
if ! docker image inspect "${CONTAINER_IMAGE:-nanoclaw-agent:latest}" >/dev/null 2>&1; then
  bash scripts/ensure-docker.sh
  step "Building the agent image (once; a few minutes)"
  ./container/build.sh
fi

demo_root="$PWD/data/demo"
mkdir -p "$demo_root/groups/global"
log=$(mktemp "${TMPDIR:-/tmp}/nanoclaw-demo-model.XXXXXX")
bun scripts/scripted-model.ts --demo demo-key >"$log" 2>&1 &
model_pid=$!
trap 'kill "$model_pid" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do [ -s "$log" ] && break; sleep 0.05; done
url=$(head -n 1 "$log")
case "$url" in http://127.0.0.1:*) ;; *) echo "The demo model did not start: $(cat "$log")" >&2; exit 1 ;; esac

cat <<MSG
──────────────────────────────────────────────────────────────────────────────
  DEMO: the model is a script ($url), not Kimi. It echoes what you say, and
  shows the machinery with a few commands:
    !steps                     two steps, two messages
    !ask Which day? | Sat | Sun   a question with options (answer with a number)
    !shell ls /workspace       the agent's shell, inside its container
    !tool mcp__nanoclaw__schedule_task {"prompt":"hi","schedule_type":"once","schedule_value":"2030-01-01 09:00"}
  With a real key: put KIMI_API_KEY in .env and run npm start.
──────────────────────────────────────────────────────────────────────────────
MSG
NANOCLAW_ROOT="$demo_root" KIMI_API_KEY=demo-key KIMI_BASE_URL="$url" bun nanoclaw.ts chat "$@"
