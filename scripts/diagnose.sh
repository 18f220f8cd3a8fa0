#!/usr/bin/env bash
# NanoClaw health check: every check prints OK or FAIL, and every FAIL says how to fix it.
#
#   scripts/diagnose.sh          human-readable
#   scripts/diagnose.sh --json   one JSON object per check, in an array
#
# Works from any directory (it finds the project next to itself, or NANOCLAW_ROOT).
# Exit status = the number of failed checks (0 = healthy).
set -uo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CODE_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
ROOT=${NANOCLAW_ROOT:-$CODE_DIR}
JSON=0
[ "${1:-}" = "--json" ] && JSON=1

# Settings the way nanoclaw.ts reads them: the environment wins over .env.
env_value() {
  local key=$1 value=${!1:-}
  if [ -z "$value" ] && [ -f "$ROOT/.env" ]; then
    value=$(grep -E "^(export[[:space:]]+)?$key=" "$ROOT/.env" | tail -n 1 | sed -E "s/^(export[[:space:]]+)?$key=//; s/^[\"']//; s/[\"']$//")
  fi
  printf '%s' "$value"
}
RUNTIME=$(env_value CONTAINER_RUNTIME); RUNTIME=${RUNTIME:-docker}
IMAGE=$(env_value CONTAINER_IMAGE); IMAGE=${IMAGE:-nanoclaw-agent:latest}
DB="$ROOT/store/messages.db"

FAILURES=0
RESULTS=()
json_escape() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' | awk 'BEGIN{ORS="\\n"} {print}' | sed 's/\\n$//'; }

# report <ok|fail|info> <check name> <detail> [fix]
report() {
  local status=$1 name=$2 detail=$3 fix=${4:-}
  [ "$status" = fail ] && FAILURES=$((FAILURES + 1))
  if [ $JSON = 1 ]; then
    RESULTS+=("{\"check\":\"$(json_escape "$name")\",\"status\":\"$status\",\"detail\":\"$(json_escape "$detail")\",\"fix\":\"$(json_escape "$fix")\"}")
    return
  fi
  local label
  case $status in ok) label="OK  " ;; fail) label="FAIL" ;; *) label="INFO" ;; esac
  printf '%s  %s: %s\n' "$label" "$name" "$detail"
  [ -n "$fix" ] && [ "$status" = fail ] && printf '      fix: %s\n' "$fix"
}

have() { command -v "$1" >/dev/null 2>&1; }
sql() { sqlite3 -batch -noheader "$DB" "$1" 2>/dev/null; }

# 1. API key
KEY=$(env_value KIMI_API_KEY)
PROVIDER=$(env_value KIMI_PROVIDER)
if [ -n "$KEY" ]; then
  report ok "API key" "KIMI_API_KEY is set (${#KEY} characters)"
elif [ -n "$PROVIDER" ] && [ "$PROVIDER" != kimi ]; then
  report ok "API key" "none needed: KIMI_PROVIDER=$PROVIDER"
else
  report fail "API key" "KIMI_API_KEY is not set in the environment or $ROOT/.env" "cp .env.example .env, then put your key on its line: KIMI_API_KEY=sk-…"
fi

# 2. How the key reaches the container
if ! grep -q 'proxy: this.proxy' "$CODE_DIR/nanoclaw.ts" 2>/dev/null; then
  report fail "Key delivery" "nanoclaw.ts no longer runs containers through its model proxy, so the key could reach them" "restore 'proxy: this.proxy' in Host.runAgent (see SECURITY.md)"
elif ! grep -Eq '^[[:space:]]*env[[:space:]]*=[[:space:]]*false' "$CODE_DIR/bunfig.toml" 2>/dev/null; then
  report fail "Key delivery" "bunfig.toml lets Bun load .env into process.env, so child processes could inherit the key" "put 'env = false' at the top of bunfig.toml"
elif [ -f "$ROOT/data/env/env" ]; then
  report fail "Key delivery" "data/env/env holds a copy of your key on disk; NanoClaw does not use it" "rm data/env/env (the key stays on the host: containers reach the model through NanoClaw's proxy)"
else
  report ok "Key delivery" "the key stays on the host; each container gets a per-run token for NanoClaw's model proxy"
fi

# 3. Docker engine
ENGINE_OK=0
if ! have "$RUNTIME"; then
  report fail "Container engine" "'$RUNTIME' is not installed" "install Docker (Docker Desktop on macOS, 'sudo apt-get install docker.io' on Debian/Ubuntu)"
elif INFO=$("$RUNTIME" info 2>&1); then
  ENGINE_OK=1
  report ok "Container engine" "$RUNTIME is running"
else
  report fail "Container engine" "$RUNTIME info failed: $(printf '%s' "$INFO" | grep -m1 -v '^\s*$')" "start Docker: open Docker Desktop (macOS) or 'sudo systemctl start docker' (Linux)"
fi

# 4. Image and its kimi
if [ $ENGINE_OK = 0 ]; then
  report fail "Agent image" "cannot check $IMAGE without a running engine" "start the container engine first"
elif ! "$RUNTIME" image inspect "$IMAGE" >/dev/null 2>&1; then
  report fail "Agent image" "$IMAGE does not exist" "./container/build.sh"
else
  KIMI_VERSION=$("$RUNTIME" run --rm --entrypoint kimi "$IMAGE" --version 2>/dev/null | head -n 1)
  if [ -n "$KIMI_VERSION" ]; then
    report ok "Agent image" "$IMAGE, kimi $KIMI_VERSION"
  else
    report fail "Agent image" "$IMAGE exists but 'kimi --version' fails inside it" "./container/build.sh --no-cache"
  fi
fi

# 5. Session mount path
if grep -q "containerPath: '/home/node/.kimi'" "$CODE_DIR/nanoclaw.ts" 2>/dev/null && ! grep -q "/root/.kimi" "$CODE_DIR/nanoclaw.ts"; then
  report ok "Session mount" "data/sessions/<folder>/.kimi -> /home/node/.kimi"
else
  report fail "Session mount" "nanoclaw.ts does not mount the sessions at /home/node/.kimi (the container's HOME is /home/node)" "in buildMounts(), set containerPath: '/home/node/.kimi' (not /root/.kimi)"
fi

# 6. Groups and the main group
if [ ! -d "$ROOT/groups" ]; then
  report fail "Groups" "$ROOT/groups is missing" "git checkout groups/ (or create groups/global and groups/main)"
elif ! have sqlite3; then
  report fail "Groups" "sqlite3 is not installed, so the registered groups cannot be read" "install sqlite3 ('brew install sqlite' / 'sudo apt-get install sqlite3')"
elif [ ! -f "$DB" ]; then
  report fail "Groups" "no database yet ($DB)" "run 'bun nanoclaw.ts chat' or 'bun nanoclaw.ts auth' once"
else
  MAIN=$(sql "SELECT folder || ' (' || jid || ')' FROM registered_groups WHERE is_main = 1")
  COUNT=$(sql "SELECT COUNT(*) FROM registered_groups")
  if [ -n "$MAIN" ]; then
    report ok "Groups" "$COUNT registered, main is $MAIN"
  else
    report fail "Groups" "no main group registered" "bun nanoclaw.ts auth (WhatsApp self-chat) or bun nanoclaw.ts chat (terminal)"
  fi
fi

# 7. Recent container logs, and the last error in them
# Newest first by the timestamp in the file name (mtimes can tie). Agents can write in
# groups/: only regular files that are not links, in folders that are not links, are read.
runs_newest_first() {
  for log in "$ROOT"/groups/*/logs/container-*.log; do
    [ -f "$log" ] && [ ! -L "$log" ] && [ ! -L "$(dirname "$log")" ] && printf '%s %s\n' "$(basename "$log")" "$log"
  done | sort -r | cut -d' ' -f2-
}
RECENT=$(runs_newest_first | head -n 3)
if [ -z "$RECENT" ]; then
  report info "Container logs" "no container runs yet"
else
  LAST_FAILED=""
  for log in $(runs_newest_first | head -n 20); do
    if ! grep -q '^Exit code:  0' "$log"; then LAST_FAILED=$log; break; fi
  done
  NEWEST=${RECENT%%$'\n'*}
  if [ -n "$LAST_FAILED" ] && [ "$LAST_FAILED" = "$NEWEST" ]; then
    ERROR=$(grep -m1 '^Results:' "$LAST_FAILED" | sed 's/^Results: *//')
    report fail "Container logs" "the latest run failed: ${LAST_FAILED#$ROOT/} ($ERROR)" "read that log's Stderr section; common causes are in README → Troubleshooting"
  else
    report ok "Container logs" "latest: ${NEWEST#$ROOT/}${LAST_FAILED:+ (an earlier failure: ${LAST_FAILED#$ROOT/})}"
  fi
fi

# 8. Session continuity: consecutive runs of a group should reuse one session id
LOG="$ROOT/logs/nanoclaw.log"
if [ ! -f "$LOG" ] || ! grep -q "Session initialized" "$LOG"; then
  report info "Session continuity" "no sessions logged yet"
else
  WORST=$(grep "Session initialized" "$LOG" | sed -E 's/.*\[([^]]+)\] Session initialized: (.*)$/\1 \2/' \
    | awk '{ runs[$1] = runs[$1] " " $2 } END { for (g in runs) { n = split(runs[g], ids, " "); start = n > 5 ? n - 4 : 1; delete seen; d = 0; for (i = start; i <= n; i++) if (!(ids[i] in seen)) { seen[ids[i]] = 1; d++ } print d, g } }' \
    | sort -rn | head -n 1)
  DISTINCT=${WORST%% *}
  if [ "${DISTINCT:-0}" -le 2 ]; then
    report ok "Session continuity" "recent runs reuse their group's session"
  else
    report fail "Session continuity" "group ${WORST#* } used $DISTINCT different sessions in its last 5 runs" "check the session mount (above); to start over: bun nanoclaw.ts sessions clear ${WORST#* }"
  fi
fi

# 9. Bun
if have bun; then
  report ok "Bun" "$(bun --version)"
else
  report fail "Bun" "bun is not installed" "npm install -g bun (or: npm run setup)"
fi

# 10. WhatsApp credentials
if [ -f "$ROOT/store/auth/creds.json" ]; then
  report ok "WhatsApp" "credentials present in store/auth/"
else
  report fail "WhatsApp" "not linked (no store/auth/creds.json)" "bun nanoclaw.ts auth   (or: bun nanoclaw.ts auth --pairing-code <your phone number>)"
fi

# 11. Database integrity
if [ -f "$DB" ] && have sqlite3; then
  INTEGRITY=$(sqlite3 "$DB" "PRAGMA integrity_check" 2>&1 | head -n 1)
  if [ "$INTEGRITY" = ok ]; then
    report ok "Database" "store/messages.db passes integrity_check"
  else
    report fail "Database" "store/messages.db is damaged: $INTEGRITY" "stop NanoClaw, keep a copy, then: sqlite3 store/messages.db '.recover' | sqlite3 store/recovered.db, and move recovered.db into place"
  fi
elif [ -f "$DB" ]; then
  report fail "Database" "sqlite3 is not installed" "install sqlite3"
else
  report info "Database" "no database yet"
fi

# 12. IPC files stuck or rejected
STUCK=$(find "$ROOT/data/ipc" -path '*/errors' -prune -o \( -path '*/messages/*.json' -o -path '*/tasks/*.json' \) -mmin +2 -print 2>/dev/null | wc -l | tr -d ' ')
REJECTED=$(find "$ROOT/data/ipc/errors" -type f 2>/dev/null | wc -l | tr -d ' ')
if [ "$STUCK" -gt 0 ]; then
  report fail "IPC" "$STUCK file(s) waiting in data/ipc/*/messages|tasks for over 2 minutes" "start NanoClaw (it processes them); if it runs, see logs/nanoclaw.error.log"
elif [ "$REJECTED" -gt 0 ]; then
  report fail "IPC" "$REJECTED rejected file(s) in data/ipc/errors/" "read them and the 'IPC file rejected' lines in logs/nanoclaw.log, then delete them"
else
  report ok "IPC" "nothing stuck, nothing rejected"
fi

# 13. Disk space
FREE_KB=$(df -Pk "$ROOT" 2>/dev/null | awk 'NR == 2 { print $4 }')
if [ -n "$FREE_KB" ] && [ "$FREE_KB" -lt 1048576 ]; then
  report fail "Disk" "only $((FREE_KB / 1024)) MB free where the project lives" "free some space (old logs: groups/*/logs/, docker image prune)"
else
  report ok "Disk" "$((${FREE_KB:-0} / 1024 / 1024)) GB free"
fi

# 14. The service
PID=$(cat "$ROOT/data/nanoclaw.pid" 2>/dev/null)
if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
  report ok "Service" "running (pid $PID)"
elif have systemctl && systemctl --user is-active --quiet nanoclaw 2>/dev/null; then
  report ok "Service" "systemd user unit nanoclaw is active"
else
  report fail "Service" "NanoClaw is not running" "bun nanoclaw.ts service install (runs it in the background), or bun nanoclaw.ts"
fi

# 15. The model endpoint: one cheap authenticated request through NanoClaw's own proxy
if [ -z "$KEY" ] || ! have bun; then
  report info "Model endpoint" "not checked (needs a key and bun)"
else
  CHECK=$(NANOCLAW_ROOT="$ROOT" bun "$CODE_DIR/nanoclaw.ts" model check 2>&1 | tail -n 1)
  case $CHECK in
    OK:*) report ok "Model endpoint" "${CHECK#OK: }" ;;
    "NOT CHECKED:"*) report info "Model endpoint" "not checked: ${CHECK#NOT CHECKED: }" ;;
    FAIL:*) report fail "Model endpoint" "${CHECK#FAIL: }" "set KIMI_PLATFORM for your kind of key (README → Configuration), or put a valid KIMI_API_KEY in .env; then: bun nanoclaw.ts model check" ;;
    *) report fail "Model endpoint" "bun nanoclaw.ts model check did not run: $CHECK" "cd $CODE_DIR && bun install" ;;
  esac
fi

if [ $JSON = 1 ]; then
  printf '[%s]\n' "$(IFS=,; echo "${RESULTS[*]}")"
else
  printf '\n%s\n' "$([ $FAILURES = 0 ] && echo 'All checks passed.' || echo "$FAILURES check(s) failed.")"
fi
exit "$FAILURES"
