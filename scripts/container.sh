#!/usr/bin/env bash
# Manual checks of the agent image, with the same mounts NanoClaw uses.
#
#   scripts/container.sh test [folder] [prompt]   the full agent flow: a prompt through the real runner
#   scripts/container.sh kimi                     kimi --version and kimi info (its files checked by kimi doctor) inside the image
#   scripts/container.sh shell [folder]           an interactive shell, mounted as for that group
#   scripts/container.sh mounts [folder]          what the group's container sees under /workspace
#   scripts/container.sh owners                   who runs the container and who owns /workspace and /app
#
# folder defaults to main. Uses CONTAINER_RUNTIME / CONTAINER_IMAGE and NANOCLAW_ROOT like nanoclaw.ts.
# The API key is read from the environment or .env and goes to the container on stdin only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${NANOCLAW_ROOT:-$PWD}
env_value() {
  local key=$1 value=${!1:-}
  if [ -z "$value" ] && [ -f "$ROOT/.env" ]; then
    value=$(grep -E "^(export[[:space:]]+)?$key=" "$ROOT/.env" | tail -n 1 | sed -E "s/^(export[[:space:]]+)?$key=//; s/^[\"']//; s/[\"']$//")
  fi
  printf '%s' "$value"
}
RUNTIME=$(env_value CONTAINER_RUNTIME); RUNTIME=${RUNTIME:-docker}
IMAGE=$(env_value CONTAINER_IMAGE); IMAGE=${IMAGE:-nanoclaw-agent:latest}

# The group's mounts, exactly as the host gives them (bun nanoclaw.ts mounts), for one run of
# this script. A group that never ran has no folders yet: docker would create them owned by
# root and the agent would die of EACCES inside, so that is said in one line instead.
mount_args() {
  local folder=${1:-main} listed line source
  listed=$(bun nanoclaw.ts mounts "$folder" --docker-args) || exit 2 # it said why, on stderr
  MOUNTS=()
  while IFS= read -r line; do
    [ "$line" = -v ] && continue
    case $line in
      *'<run>.sock:'* | *'<run>.egress.sock:'*) continue ;; # no proxy runs here: the key goes on stdin
      *'<run>'*) line=${line//<run>/script-$$}; RUN_INBOX=${line%%:*}; mkdir -p "$RUN_INBOX"; trap 'rm -rf "$RUN_INBOX"' EXIT ;;
    esac
    source=${line%%:*}
    if [ ! -e "$source" ]; then
      echo "groups/$folder has not run yet ($source does not exist): send it a message first (main: bun nanoclaw.ts chat), then try again." >&2
      exit 2
    fi
    MOUNTS+=(-v "$line")
  done <<<"$listed"
}

json_string() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }

case "${1:-}" in
  test)
    folder=${2:-main}; prompt=${3:-What is 2+2?}
    mount_args "$folder"
    jid=$(sqlite3 "$ROOT/store/messages.db" "SELECT jid FROM registered_groups WHERE folder = '$folder'" 2>/dev/null || echo "$folder@g.us")
    is_main=$(sqlite3 "$ROOT/store/messages.db" "SELECT CASE is_main WHEN 1 THEN 'true' ELSE 'false' END FROM registered_groups WHERE folder = '$folder'" 2>/dev/null || echo false)
    key=$(env_value KIMI_API_KEY)
    # One answer, then exit: the close request is waiting in the run's input folder.
    : >"$RUN_INBOX/_close"
    echo "Running the agent for groups/$folder with: $prompt" >&2
    printf '{"prompt":"%s","groupFolder":"%s","chatJid":"%s","isMain":%s,"secrets":{"KIMI_API_KEY":"%s"}}' \
      "$(json_string "$prompt")" "$folder" "$jid" "${is_main:-false}" "$(json_string "$key")" \
      | "$RUNTIME" run -i --rm -e TZ="$(env_value TZ)" "${MOUNTS[@]}" "$IMAGE"
    ;;
  kimi)
    "$RUNTIME" run --rm --entrypoint /bin/bash "$IMAGE" -c 'echo "kimi $(kimi --version)"; kimi info'
    ;;
  shell)
    mount_args "${2:-main}"
    exec "$RUNTIME" run --rm -it "${MOUNTS[@]}" --entrypoint /bin/bash "$IMAGE"
    ;;
  mounts)
    mount_args "${2:-main}"
    bun nanoclaw.ts mounts "${2:-main}"
    echo
    "$RUNTIME" run --rm "${MOUNTS[@]}" --entrypoint /bin/bash "$IMAGE" -c 'ls -la /workspace/ /workspace/* /home/node/.kimi 2>&1'
    ;;
  owners)
    "$RUNTIME" run --rm --entrypoint /bin/bash "$IMAGE" -c 'echo "user: $(whoami) (uid $(id -u)), HOME=$HOME"; ls -la /workspace/ /app/'
    ;;
  *)
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
