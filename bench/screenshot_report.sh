#!/usr/bin/env bash
# Screenshot an evaluation report (index.html written by `huse eval --report DIR`) with headless
# Chromium, to check its layout without a desktop.
#
#   bench/screenshot_report.sh REPORT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT]
#
# Needs Chromium (Debian: `apt-get install -y chromium`). Default size 1400x4000 (a laptop-wide
# window, tall enough for the whole page). Runs with a fresh, throw-away profile and no network
# services; --no-sandbox because this is typically run as root in a container.
set -euo pipefail

target=${1:?usage: $0 REPORT_DIR_OR_HTML [OUT.png] [WIDTHxHEIGHT]}
out=${2:-report.png}
size=${3:-1400x4000}
[[ -d $target ]] && target=$target/index.html
[[ -f $target ]] || { echo "no such report: $target" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "Chromium not found: apt-get install -y chromium" >&2; exit 1; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
url="file://$(realpath "$target")"
out=$(realpath -m "$out")
rm -f "$out"

"$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --hide-scrollbars --user-data-dir="$profile" \
  --screenshot="$out" --window-size="${size/x/,}" "$url" 2>&1 \
  | { grep -v -e dbus -e Fontconfig -e 'unexpected operator' -e 'bytes written' || true; }
[[ -s $out ]] || { echo "Chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $out ($(du -k "$out" | cut -f1) KiB)"
