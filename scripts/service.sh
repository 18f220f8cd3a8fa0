#!/usr/bin/env bash
# Runs NanoClaw in the background: a systemd user unit (Linux) or a launchd agent (macOS).
#
# Usage: scripts/service.sh install|uninstall|status [--dry-run] [--platform linux|macos]
#        bun nanoclaw.ts service …     (the same, run by the host)
#
#   --dry-run    print the unit file and the commands; change nothing
#
# Each install gets its own unit, named after its data folder (NANOCLAW_ROOT, or the project
# next to this script): two installs on one machine never replace each other's. The unit
# starts this checkout's nanoclaw.ts with NANOCLAW_ROOT set, so a data folder elsewhere works.
# Output goes to <root>/logs/. Exit status: 0 done, 1 the service manager failed, 2 a wrong
# call, 3 (status) not running or the manager cannot be reached.
set -uo pipefail

CODE=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${NANOCLAW_ROOT:-$CODE}
BUN=${BUN:-$(command -v bun)}
ACTION=${1:-}; shift || true
DRY=0
usage() { sed -n '4,6p' "$0" | sed 's/^# \{0,1\}//' >&2; }
PLATFORM=$([ "$(uname)" = Darwin ] && echo macos || echo linux)
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --platform) PLATFORM=${2:-}; shift ;;
    --platform=*) PLATFORM=${1#*=} ;;
    *) echo "service.sh: unknown option '$1'" >&2; usage; exit 2 ;;
  esac
  shift
done
case "$ACTION:$PLATFORM" in
  install:linux | uninstall:linux | status:linux | install:macos | uninstall:macos | status:macos) ;;
  *) usage; exit 2 ;;
esac

# The install's id, as the host labels its containers (installId): sha256 of the real root path.
real_root=$(cd "$ROOT" 2>/dev/null && pwd -P || printf '%s' "$ROOT")
sha256() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi; }
ID=$(printf '%s' "$real_root" | sha256 | cut -c1-12)
ENTRY="$CODE/nanoclaw.ts"
OUT="$ROOT/logs/nanoclaw.log"
ERR="$ROOT/logs/nanoclaw.error.log"
PATH_ENV=${PATH:-/usr/local/bin:/usr/bin:/bin}
xml() { sed -e 's/&/\&amp;/g' -e 's/</\&lt;/g' -e 's/>/\&gt;/g' <<<"$1"; }

if [ "$PLATFORM" = linux ]; then
  NAME="nanoclaw-$ID"
  FILE="$HOME/.config/systemd/user/$NAME.service"
  MANAGER='systemd (your user instance)'
  unit() {
    cat <<UNIT
[Unit]
Description=NanoClaw personal assistant ($ROOT)
After=network-online.target

[Service]
Type=simple
WorkingDirectory=$ROOT
ExecStart=$BUN $ENTRY
Environment=NANOCLAW_ROOT=$ROOT
Environment=PATH=$PATH_ENV
Restart=on-failure
RestartSec=10
RestartPreventExitStatus=2
StandardOutput=append:$OUT
StandardError=append:$ERR

[Install]
WantedBy=default.target
UNIT
  }
  INSTALL=("systemctl --user daemon-reload" "systemctl --user enable --now $NAME")
  UNINSTALL=("systemctl --user disable --now $NAME" "systemctl --user daemon-reload")
  STATUS=("systemctl --user status $NAME --no-pager")
else
  NAME="com.nanoclaw.$ID"
  FILE="$HOME/Library/LaunchAgents/$NAME.plist"
  MANAGER=launchd
  unit() {
    cat <<PLIST
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
  <key>Label</key><string>$NAME</string>
  <key>ProgramArguments</key>
  <array><string>$(xml "$BUN")</string><string>$(xml "$ENTRY")</string></array>
  <key>WorkingDirectory</key><string>$(xml "$ROOT")</string>
  <key>EnvironmentVariables</key>
  <dict><key>NANOCLAW_ROOT</key><string>$(xml "$ROOT")</string><key>PATH</key><string>$(xml "$PATH_ENV")</string></dict>
  <key>RunAtLoad</key><true/>
  <key>KeepAlive</key><true/>
  <key>StandardOutPath</key><string>$(xml "$OUT")</string>
  <key>StandardErrorPath</key><string>$(xml "$ERR")</string>
</dict>
</plist>
PLIST
  }
  printf -v QUOTED_FILE '%q' "$FILE" # a home folder with a space stays one word
  INSTALL=("launchctl load -w $QUOTED_FILE")
  UNINSTALL=("launchctl unload -w $QUOTED_FILE")
  STATUS=("launchctl list $NAME")
fi

case $ACTION in
  install) COMMANDS=("${INSTALL[@]}") ;;
  uninstall) COMMANDS=("${UNINSTALL[@]}") ;;
  status) COMMANDS=("${STATUS[@]}") ;;
esac

if [ $DRY = 1 ]; then
  [ "$ACTION" = install ] && { echo "# $FILE"; unit; }
  [ "$ACTION" = uninstall ] && echo "# would remove $FILE"
  for command in "${COMMANDS[@]}"; do echo "\$ $command"; done
  exit 0
fi

if [ "$ACTION" = install ]; then
  mkdir -p "$(dirname "$FILE")" "$ROOT/logs"
  unit >"$FILE"
  echo "Wrote $FILE"
fi
for command in "${COMMANDS[@]}"; do
  output=$(eval "$command" 2>&1) # each command is written shell-quoted, as the dry run shows it
  status=$?
  why=$(grep -m1 . <<<"$output"); why=${why:-no output}
  if [ $status = 0 ]; then
    [ -n "$output" ] && echo "$output"
    continue
  fi
  case $ACTION in
    install)
      hint=$([ "$PLATFORM" = linux ] && echo ' Is systemd running for your user (loginctl enable-linger $USER)?')
      echo "$FILE is written, but \`$command\` failed: $why.$hint" >&2
      exit 1 ;;
    status)
      if grep -qiE 'Failed to connect to bus|not been booted with systemd|No such file or directory|not found' <<<"$output"; then
        where=$([ -f "$FILE" ] && echo "installed at $FILE" || echo 'not installed')
        echo "$MANAGER cannot be reached ($why); the unit file is $where."
      else
        [ -n "$output" ] && echo "$output"
        echo "NanoClaw is not running as a service$([ -f "$FILE" ] || echo ' (not installed: bun nanoclaw.ts service install)')."
      fi
      exit 3 ;;
    uninstall)
      # The file goes anyway; say why nothing could be stopped.
      echo "$MANAGER could not be asked to stop NanoClaw ($why)."
      break ;;
  esac
done
if [ "$ACTION" = uninstall ]; then
  if [ -f "$FILE" ]; then rm -f "$FILE" && echo "Removed $FILE"; else echo "No service file at $FILE; nothing to remove."; fi
fi
exit 0
