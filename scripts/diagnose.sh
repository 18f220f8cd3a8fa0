#!/usr/bin/env bash
# NanoClaw health check: every check prints OK, FAIL or INFO, and every FAIL says how to fix it.
#
# Usage: scripts/diagnose.sh [--json]
#        bun nanoclaw.ts diagnose [--json]     (the same, run by the host)
#
#   --json       one JSON object per check ({check, status, detail, fix}), in an array
#   -h, --help   this text
#
# Works from any directory (it finds the project next to itself, or NANOCLAW_ROOT).
# Settings, the WhatsApp link, the mounts and the model check come from the host itself
# (bun nanoclaw.ts config get / auth --check / mounts / model check), so they mean here
# exactly what they mean to NanoClaw. Nothing is installed, and nothing leaves the
# machine but the model check's one request.
# Exit status = the number of failed checks (0 = healthy); 2 for an unknown option.
set -uo pipefail
# Text is searched with `grep … <<<"$TEXT"`, never `printf … | grep -q`: under pipefail a grep that stops at its
# first match can kill printf with SIGPIPE and turn a match into a failure (it made the checks flaky under load).

usage() {
  cat <<'USAGE'
Usage: scripts/diagnose.sh [--json]
       bun nanoclaw.ts diagnose [--json]     (the same, run by the host)

  --json       one JSON object per check ({check, status, detail, fix}), in an array
  -h, --help   this text

Every check prints OK, FAIL (with its fix) or INFO (a note, not a problem).
Exit status: the number of failed checks (0 = healthy); 2 for an unknown option.
USAGE
}

JSON=0
for arg in "$@"; do
  case $arg in
    --json) JSON=1 ;;
    -h|--help) usage; exit 0 ;;
    *) printf "diagnose.sh: unknown option '%s'\n" "$arg" >&2; usage >&2; exit 2 ;;
  esac
done

# A key given in the environment goes to the host's own commands below and to nothing
# else this script starts (docker, sqlite3): it stays in this shell, unexported.
ENV_KEY=${KIMI_API_KEY:-}
export -n KIMI_API_KEY 2>/dev/null || true

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CODE_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
ROOT=${NANOCLAW_ROOT:-$CODE_DIR}
[ -d "$ROOT" ] && ROOT=$(cd "$ROOT" && pwd)
DB="$ROOT/store/messages.db"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/nanoclaw-diagnose.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

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

# The host's CLI for this project. Run from the code directory (so only NanoClaw's own
# bunfig.toml applies), never installing packages on the fly, never loading a .env into
# its environment (the host reads .env itself, as it always does).
# Sets HOST_OUT (stdout), HOST_CODE (exit status) and HOST_ERR (the line of stderr that says what went wrong).
host() {
  HOST_CODE=0
  (cd "$CODE_DIR" && if [ -n "$ENV_KEY" ]; then export KIMI_API_KEY=$ENV_KEY; fi && NANOCLAW_ROOT="$ROOT" bun --no-install --no-env-file "$CODE_DIR/nanoclaw.ts" "$@") >"$TMP/stdout" 2>"$TMP/stderr" || HOST_CODE=$?
  HOST_OUT=$(cat "$TMP/stdout")
  if [ "$HOST_CODE" = 2 ]; then
    HOST_ERR=$(grep -m1 -v '^[[:space:]]*$' "$TMP/stderr")
    HOST_ERR=${HOST_ERR:-exit status 2}
  else
    HOST_ERR=$(grep -m1 -E '^(error|[A-Za-z]*Error)[: ]' "$TMP/stderr" || grep -m1 -v '^[[:space:]]*$' "$TMP/stderr")
  fi
  return 0
}

# ── What the host says, asked once up front ──────────────────────────────────────────

# Settings the way the host uses them (environment over .env, comments handled, defaults applied).
# If the host cannot run, the environment or the defaults stand in so the other checks still run.
KEYS=(KIMI_API_KEY KIMI_PROVIDER CONTAINER_RUNTIME CONTAINER_IMAGE)
HOST_OK=0
SETTINGS_PROBLEM="" SETTINGS_FIX=""
KEY_STATE="" PROVIDER=${KIMI_PROVIDER:-kimi} RUNTIME=${CONTAINER_RUNTIME:-docker} IMAGE=${CONTAINER_IMAGE:-nanoclaw-agent:latest}
if have bun; then
  host config get "${KEYS[@]}"
  VALUES=()
  if [ "$HOST_CODE" = 0 ]; then
    while IFS= read -r line || [ -n "$line" ]; do VALUES+=("$line"); done <"$TMP/stdout"
  fi
  if [ "$HOST_CODE" = 0 ] && [ ${#VALUES[@]} = ${#KEYS[@]} ]; then
    HOST_OK=1
    KEY_STATE=${VALUES[0]} PROVIDER=${VALUES[1]:-kimi} RUNTIME=${VALUES[2]:-docker} IMAGE=${VALUES[3]:-nanoclaw-agent:latest}
  elif [ "$HOST_CODE" = 0 ]; then
    SETTINGS_PROBLEM="bun nanoclaw.ts config get printed ${#VALUES[@]} line(s) for ${#KEYS[@]} settings"
    SETTINGS_FIX="nanoclaw.ts and scripts/diagnose.sh should come from the same version (git status)"
  elif [ "$HOST_CODE" = 2 ]; then
    SETTINGS_PROBLEM="NanoClaw refuses its settings: ${HOST_ERR%.}"
    SETTINGS_FIX="correct that setting in $ROOT/.env (or in the environment), as the message says; then run this again"
  else
    SETTINGS_PROBLEM="bun nanoclaw.ts cannot run: ${HOST_ERR:-exit status $HOST_CODE}"
    SETTINGS_FIX="cd $CODE_DIR && bun install"
  fi
fi

# The main group, from the database. A terminal-only user's main chat is main@local;
# after linking WhatsApp it is the user's own <number>@s.whatsapp.net.
MAIN_FOLDER="" MAIN_JID=""
if [ -f "$DB" ] && have sqlite3; then
  MAIN_ROW=$(sql "SELECT folder || '|' || jid FROM registered_groups WHERE is_main = 1 LIMIT 1")
  if [ -n "$MAIN_ROW" ]; then MAIN_FOLDER=${MAIN_ROW%%|*} MAIN_JID=${MAIN_ROW#*|}; fi
fi
TERMINAL_USER=0
case $MAIN_JID in *@local) TERMINAL_USER=1 ;; esac

# WhatsApp link: 0 linked, 4 a pairing started but never finished, 3 not linked.
AUTH_CODE="" AUTH_LINE=""
if [ $HOST_OK = 1 ]; then
  host auth --check
  AUTH_CODE=$HOST_CODE AUTH_LINE=${HOST_OUT:-$HOST_ERR}
fi

# The main group's mount table, as the host would hand it to docker.
MOUNTS="" MOUNTS_PROBLEM=""
if [ $HOST_OK = 1 ] && [ -n "$MAIN_FOLDER" ]; then
  host mounts "$MAIN_FOLDER"
  if [ "$HOST_CODE" = 0 ]; then MOUNTS=$HOST_OUT; else MOUNTS_PROBLEM="bun nanoclaw.ts mounts $MAIN_FOLDER failed: ${HOST_ERR:-exit status $HOST_CODE}"; fi
fi

# The mounts of the table ("<host> -> <container> (rw|ro)"), one "<host><TAB><container>" a line.
MOUNT_LIST=$(printf '%s\n' "$MOUNTS" | while IFS= read -r line; do
  case $line in *' -> '*' (rw)'|*' -> '*' (ro)') ;; *) continue ;; esac
  line=${line% (r[ow])}
  printf '%s\t%s\n' "${line%% -> *}" "${line#* -> }"
done)

# is_within PATH DIR: PATH is DIR or inside it
is_within() { [ "$1" = "$2" ] || [ "${1#"$2"/}" != "$1" ]; }

# Files holding the key that a container of the main group would see unmasked, one
# "<file> (seen at <container path>)" a line. A file shows through a mount of itself or
# of a folder above it, unless a deeper mount (a mask) covers that place.
key_file_exposures() {
  local file host target seen other_host other_target hidden
  for file in "$ROOT/.env" "$ROOT/data/env/env"; do
    [ -e "$file" ] || continue
    while IFS=$'\t' read -r host target; do
      [ -n "$host" ] && is_within "$file" "$host" || continue
      if [ "$host" = / ]; then seen=${target%/}$file; else seen=$target${file#"$host"}; fi
      hidden=0
      while IFS=$'\t' read -r other_host other_target; do
        [ ${#other_target} -gt ${#target} ] && is_within "$seen" "$other_target" || continue
        is_within "$file" "$other_host" && continue # it shows the same file again
        hidden=1
      done <<<"$MOUNT_LIST"
      [ $hidden = 0 ] && printf '%s (seen at %s)\n' "${file#"$ROOT"/}" "$seen"
    done <<<"$MOUNT_LIST"
  done
  return 0
}

# ── The checks ───────────────────────────────────────────────────────────────────────

# 0. Settings, read through the host
if ! have bun; then
  report info "Settings" "not read: bun is not installed (see Bun); the checks below use the environment or the defaults"
elif [ $HOST_OK = 1 ]; then
  report ok "Settings" "read through the host (bun nanoclaw.ts config get): runtime $RUNTIME, image $IMAGE"
else
  report fail "Settings" "$SETTINGS_PROBLEM; the checks below use the environment or the defaults" "$SETTINGS_FIX"
fi

# 1. API key
if [ $HOST_OK = 0 ]; then
  report info "API key" "not checked: the settings could not be read (see Settings)"
elif [ -n "$KEY_STATE" ]; then
  report ok "API key" "KIMI_API_KEY is $KEY_STATE"
elif [ "$PROVIDER" != kimi ]; then
  report ok "API key" "none needed: KIMI_PROVIDER=$PROVIDER"
else
  report fail "API key" "KIMI_API_KEY is not set in the environment or $ROOT/.env" "cp .env.example .env, then put your key on its line: KIMI_API_KEY=sk-…"
fi

# 2. How the key reaches the container. Behaviour, not source text: does Bun load a .env
# into process.env under the project's bunfig.toml (a throwaway .env in a temp folder, never
# the real key), and what does the host mount for the main group.
PROBE=""
if have bun && [ -f "$CODE_DIR/bunfig.toml" ]; then
  mkdir -p "$TMP/probe" && printf 'NANOCLAW_ENV_PROBE=from-the-env-file\n' >"$TMP/probe/.env"
  PROBE=$(cd "$TMP/probe" && env -u NANOCLAW_ENV_PROBE bun --config="$CODE_DIR/bunfig.toml" -e 'process.stdout.write(process.env.NANOCLAW_ENV_PROBE ? "loaded" : "not loaded")' 2>&1)
fi
EXPOSED=$(key_file_exposures)
if ! have bun; then
  report info "Key delivery" "not checked: bun is not installed (see Bun)"
elif [ ! -f "$CODE_DIR/bunfig.toml" ]; then
  report fail "Key delivery" "$CODE_DIR/bunfig.toml is missing, so Bun loads .env into process.env and child processes could inherit the key" "git checkout bunfig.toml (it starts with 'env = false')"
elif [ "$PROBE" = loaded ]; then
  report fail "Key delivery" "with this bunfig.toml Bun loads .env into process.env, so child processes (docker) could inherit the key" "put 'env = false' at the top of bunfig.toml"
elif [ "$PROBE" != "not loaded" ]; then
  report fail "Key delivery" "Bun cannot read bunfig.toml: $(printf '%s' "$PROBE" | grep -m1 -v '^[[:space:]]*$')" "fix bunfig.toml (git diff bunfig.toml); it must keep 'env = false'"
elif [ $HOST_OK = 0 ]; then
  report info "Key delivery" "partly checked: Bun leaves .env alone (bunfig.toml: env = false); the mounts are not checked: the host could not run (see Settings)"
elif [ -n "$MOUNTS_PROBLEM" ]; then
  report fail "Key delivery" "$MOUNTS_PROBLEM" "see the message; bun nanoclaw.ts mounts $MAIN_FOLDER shows what a run of the main group gets"
elif [ -n "$MAIN_FOLDER" ] && ! grep -Eq '/run/nanoclaw/model\.sock|^model proxy:' <<<"$MOUNTS"; then
  report fail "Key delivery" "the host's mount table for $MAIN_FOLDER shows no model proxy, so its containers would need the key itself" "restore the model proxy in agentLauncher (see SECURITY.md); check with: bun nanoclaw.ts mounts $MAIN_FOLDER"
elif [ -n "$EXPOSED" ]; then
  report fail "Key delivery" "a container of $MAIN_FOLDER would see a file holding the key: $(printf '%s' "$EXPOSED" | paste -sd ';' - | sed 's/;/; /g')" "keep .env, store/ and data/ masked in the main group's project mount (groupMounts, HIDDEN_FROM_MAIN; see SECURITY.md)"
elif [ -n "$MAIN_FOLDER" ]; then
  report ok "Key delivery" "the key stays on the host: Bun leaves .env alone, no mount of $MAIN_FOLDER shows .env or data/env, and each run gets a token for NanoClaw's model proxy"
else
  report ok "Key delivery" "Bun leaves .env alone (bunfig.toml: env = false); the mounts are checked once a main group exists"
fi

# 3. data/env/env: the guide's manual container test creates it by hand (cp .env data/env/env).
# NanoClaw itself never creates or mounts it.
ENV_COPY="$ROOT/data/env/env"
if [ ! -e "$ENV_COPY" ]; then
  report info "data/env/env" "not present, and not needed: NanoClaw keeps the key on the host (the guide's manual container test creates it by hand: cp .env data/env/env)"
else
  MODE=$(ls -lLd "$ENV_COPY" 2>/dev/null | cut -c1-10)
  if [ "${MODE:4:1}" = r ] || [ "${MODE:7:1}" = r ]; then
    report fail "data/env/env" "holds a copy of your key and is readable by its group or by other users ($MODE)" "chmod 600 data/env/env, or remove it when you are done with manual tests: rm data/env/env"
  else
    report info "data/env/env" "present ($MODE): a copy of your key for manual container tests; NanoClaw does not use it (remove it when done: rm data/env/env)"
  fi
fi

# 4. Docker engine
ENGINE_OK=0
if ! have "$RUNTIME"; then
  report fail "Container engine" "'$RUNTIME' is not installed" "install Docker (Docker Desktop on macOS, 'sudo apt-get install docker.io' on Debian/Ubuntu)"
elif INFO=$("$RUNTIME" info 2>&1); then
  ENGINE_OK=1
  report ok "Container engine" "$RUNTIME is running"
else
  report fail "Container engine" "$RUNTIME info failed: $(printf '%s' "$INFO" | grep -m1 -v '^\s*$')" "start Docker: open Docker Desktop (macOS) or 'sudo systemctl start docker' (Linux)"
fi

# 5. Image and its CLI: the pinned Kimi Code CLI, and its files as the main group's last run left them
PIN=$(sed -n 's/.*"@moonshot-ai\/kimi-code": *"\([^"]*\)".*/\1/p' "$CODE_DIR/container/agent-runner/package.json" 2>/dev/null)
if [ $ENGINE_OK = 0 ]; then
  report fail "Agent image" "cannot check $IMAGE without a running engine" "start the container engine first"
elif ! "$RUNTIME" image inspect "$IMAGE" >/dev/null 2>&1; then
  report fail "Agent image" "$IMAGE does not exist" "./container/build.sh"
else
  KIMI_HOME_MOUNT=()
  [ -n "$MAIN_FOLDER" ] && [ -d "$ROOT/data/sessions/$MAIN_FOLDER/.kimi" ] \
    && KIMI_HOME_MOUNT=(-v "$ROOT/data/sessions/$MAIN_FOLDER/.kimi:/home/node/.kimi:ro")
  KIMI_INFO=$("$RUNTIME" run --rm ${KIMI_HOME_MOUNT[@]+"${KIMI_HOME_MOUNT[@]}"} --entrypoint kimi "$IMAGE" info 2>&1 || true)
  KIMI_VERSION=$(printf '%s\n' "$KIMI_INFO" | sed -n 's/^kimi-code: \([^ ]*\).*/\1/p' | head -n 1)
  if [ -z "$KIMI_VERSION" ]; then
    report fail "Agent image" "$IMAGE exists but 'kimi info' fails inside it" "./container/build.sh --no-cache"
  elif [ -n "$PIN" ] && [ "$KIMI_VERSION" != "$PIN" ]; then
    report fail "Agent image" "$IMAGE runs Kimi Code CLI $KIMI_VERSION, but this checkout pins $PIN" "./container/build.sh (the image is older than the code)"
  elif grep -q 'config files are valid' <<<"$KIMI_INFO"; then
    report ok "Agent image" "$IMAGE, Kimi Code CLI $KIMI_VERSION; kimi doctor finds its files valid"
  else
    report fail "Agent image" "kimi doctor in $IMAGE: $(grep -m1 -iE 'error|invalid|fail' <<<"$KIMI_INFO" || echo 'its files are not valid')" "bun nanoclaw.ts sessions clear $MAIN_FOLDER (the runner writes config.toml again at the next run)"
  fi
fi

# 6. Session mount: where the host really mounts the main group's sessions (HOME is /home/node in the image)
SESSIONS="$ROOT/data/sessions/$MAIN_FOLDER/.kimi"
SESSION_TARGET=$(printf '%s\n' "$MOUNT_LIST" | SESSIONS=$SESSIONS awk -F '\t' '$1 == ENVIRON["SESSIONS"] { print $2; exit }')
if [ $HOST_OK = 0 ]; then
  report info "Session mount" "not checked: the host could not run (see Settings)"
elif [ -z "$MAIN_FOLDER" ]; then
  report info "Session mount" "not checked: no main group known yet (see Groups)"
elif [ -n "$MOUNTS_PROBLEM" ]; then
  report fail "Session mount" "$MOUNTS_PROBLEM" "see the message; bun nanoclaw.ts mounts $MAIN_FOLDER shows what a run gets"
elif [ "$SESSION_TARGET" = /home/node/.kimi ] && grep -qxF "$SESSIONS -> /home/node/.kimi (rw)" <<<"$MOUNTS"; then
  report ok "Session mount" "data/sessions/$MAIN_FOLDER/.kimi -> /home/node/.kimi (rw)"
elif [ "$SESSION_TARGET" = /home/node/.kimi ]; then
  report fail "Session mount" "the host mounts data/sessions/$MAIN_FOLDER/.kimi at /home/node/.kimi read-only; the CLI must write its sessions there" "in groupMounts(), mount the sessions at containerPath '/home/node/.kimi' with readonly: false"
elif [ -n "$SESSION_TARGET" ]; then
  report fail "Session mount" "the host mounts data/sessions/$MAIN_FOLDER/.kimi at $SESSION_TARGET; the CLI looks for its sessions in /home/node/.kimi (the container's HOME is /home/node)" "in groupMounts(), set containerPath: '/home/node/.kimi' for the sessions (not /root/.kimi)"
else
  report fail "Session mount" "the host does not mount data/sessions/$MAIN_FOLDER/.kimi at all, so every run starts a new session" "in groupMounts(), mount data/sessions/<folder>/.kimi at containerPath '/home/node/.kimi'"
fi

# 7. Groups and the main group
if [ ! -d "$ROOT/groups" ]; then
  report fail "Groups" "$ROOT/groups is missing" "git checkout groups/ (or create groups/global and groups/main)"
elif ! have sqlite3; then
  report fail "Groups" "sqlite3 is not installed, so the registered groups cannot be read" "install sqlite3 ('brew install sqlite' / 'sudo apt-get install sqlite3')"
elif [ ! -f "$DB" ]; then
  report fail "Groups" "no database yet ($DB)" "run 'bun nanoclaw.ts chat' or 'bun nanoclaw.ts auth' once"
else
  COUNT=$(sql "SELECT COUNT(*) FROM registered_groups")
  if [ -n "$MAIN_FOLDER" ]; then
    report ok "Groups" "$COUNT registered, main is $MAIN_FOLDER ($MAIN_JID)"
  else
    report fail "Groups" "no main group registered" "bun nanoclaw.ts auth (WhatsApp self-chat) or bun nanoclaw.ts chat (terminal)"
  fi
fi

# 8. Recent container logs, and the last error in them
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
    report fail "Container logs" "the latest run failed: ${LAST_FAILED#$ROOT/} ($ERROR)" "read that log's Stderr section; common causes are in docs/troubleshooting.md"
  else
    report ok "Container logs" "latest: ${NEWEST#$ROOT/}${LAST_FAILED:+ (an earlier failure: ${LAST_FAILED#$ROOT/})}"
  fi
fi

# 9. Session continuity: consecutive runs of a group should reuse one session id
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

# 10. Bun
if have bun; then
  report ok "Bun" "$(bun --version)"
else
  report fail "Bun" "bun is not installed" "npm install -g bun (or: npm run setup)"
fi

# 11. WhatsApp: linked means WhatsApp confirmed this device (the host's auth --check).
# A terminal-only user (main chat main@local, never linked) needs no WhatsApp at all.
if [ $HOST_OK = 0 ]; then
  report info "WhatsApp" "not checked: the host could not run (see Settings)"
elif [ "$AUTH_CODE" = 0 ]; then
  report ok "WhatsApp" "$AUTH_LINE"
elif [ "$AUTH_CODE" = 4 ]; then
  report fail "WhatsApp" "a pairing was started but never finished (store/auth/ holds no confirmed device)" "bun nanoclaw.ts auth   (it starts over; or: bun nanoclaw.ts auth --pairing-code <your phone number>)"
elif [ "$AUTH_CODE" = 3 ] && [ $TERMINAL_USER = 1 ]; then
  report info "WhatsApp" "not linked: you use the terminal (bun nanoclaw.ts chat); to add WhatsApp: bun nanoclaw.ts auth"
elif [ "$AUTH_CODE" = 3 ]; then
  report fail "WhatsApp" "not linked (store/auth/ holds no linked device)" "bun nanoclaw.ts auth   (or: bun nanoclaw.ts auth --pairing-code <your phone number>)"
else
  report fail "WhatsApp" "bun nanoclaw.ts auth --check failed: ${AUTH_LINE:-exit status $AUTH_CODE}" "see the message, then: bun nanoclaw.ts auth --check"
fi

# 12. Database integrity
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

# 13. IPC files stuck or rejected
STUCK=$(find "$ROOT/data/ipc" -path '*/errors' -prune -o \( -path '*/messages/*.json' -o -path '*/tasks/*.json' \) -mmin +2 -print 2>/dev/null | wc -l | tr -d ' ')
REJECTED=$(find "$ROOT/data/ipc/errors" -type f 2>/dev/null | wc -l | tr -d ' ')
if [ "$STUCK" -gt 0 ]; then
  report fail "IPC" "$STUCK file(s) waiting in data/ipc/*/messages|tasks for over 2 minutes" "start NanoClaw (it processes them); if it runs, see logs/nanoclaw.error.log"
elif [ "$REJECTED" -gt 0 ]; then
  report fail "IPC" "$REJECTED rejected file(s) in data/ipc/errors/" "read them and the 'IPC file rejected' lines in logs/nanoclaw.log, then delete them"
else
  report ok "IPC" "nothing stuck, nothing rejected"
fi

# 14. Disk space
FREE_KB=$(df -Pk "$ROOT" 2>/dev/null | awk 'NR == 2 { print $4 }')
if [ -n "$FREE_KB" ] && [ "$FREE_KB" -lt 1048576 ]; then
  report fail "Disk" "only $((FREE_KB / 1024)) MB free where the project lives" "free some space (old logs: groups/*/logs/, docker image prune)"
else
  report ok "Disk" "$((${FREE_KB:-0} / 1024 / 1024)) GB free"
fi

# 15. The service. Without WhatsApp a terminal user needs none: chat runs in the foreground.
PID=$(cat "$ROOT/data/nanoclaw.pid" 2>/dev/null)
if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
  report ok "Service" "running (pid $PID)"
elif NANOCLAW_ROOT=$ROOT bash "$SCRIPT_DIR/service.sh" status >/dev/null 2>&1; then # it names this install's unit
  report ok "Service" "this install's service unit is active (bun nanoclaw.ts service status)"
elif [ $TERMINAL_USER = 1 ] && [ "$AUTH_CODE" != 0 ]; then
  report info "Service" "not running, and not needed for the terminal (bun nanoclaw.ts chat); once WhatsApp is linked: bun nanoclaw.ts service install"
else
  report fail "Service" "NanoClaw is not running" "bun nanoclaw.ts service install (runs it in the background), or bun nanoclaw.ts"
fi

# 16. The model endpoint: one cheap authenticated request through NanoClaw's own proxy
if [ $HOST_OK = 0 ]; then
  report info "Model endpoint" "not checked (the host could not run; see Settings)"
elif [ -z "$KEY_STATE" ]; then
  report info "Model endpoint" "not checked (needs a key)"
else
  host model check
  CHECK=$(printf '%s' "$HOST_OUT" | tail -n 1)
  case $CHECK in
    OK:*) report ok "Model endpoint" "${CHECK#OK: }" ;;
    "NOT CHECKED:"*) report info "Model endpoint" "not checked: ${CHECK#NOT CHECKED: }" ;;
    FAIL:*) report fail "Model endpoint" "${CHECK#FAIL: }" "set KIMI_PLATFORM for your kind of key (docs/configuration.md), or put a valid KIMI_API_KEY in .env; then: bun nanoclaw.ts model check" ;;
    *) report fail "Model endpoint" "bun nanoclaw.ts model check did not run: ${HOST_ERR:-$CHECK}" "cd $CODE_DIR && bun install" ;;
  esac
fi

if [ $JSON = 1 ]; then
  printf '[%s]\n' "$(IFS=,; echo "${RESULTS[*]}")"
else
  printf '\n%s\n' "$([ $FAILURES = 0 ] && echo 'All checks passed.' || echo "$FAILURES check(s) failed.")"
fi
exit "$FAILURES"
