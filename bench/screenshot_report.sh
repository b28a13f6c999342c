#!/usr/bin/env bash
# Screenshot an evaluation report (index.html written by `huse eval --report DIR`) with headless
# Chromium, to check its layout without a desktop.
#
#   bench/screenshot_report.sh REPORT_DIR_OR_HTML [OUT.png] [WIDTH[xHEIGHT]]
#
# Needs Chromium (Debian: `apt-get install -y chromium`). Default width 1400 (a laptop-wide window);
# without a HEIGHT the whole page is captured: a first headless pass lays out a copy of the page
# with a one-line script that writes its height into the title (--dump-dom), the second takes the
# screenshot at that height. Runs with a fresh, throw-away profile and no network services;
# --no-sandbox because this is typically run as root in a container.
set -euo pipefail

target=${1:?usage: $0 REPORT_DIR_OR_HTML [OUT.png] [WIDTH[xHEIGHT]]}
out=${2:-report.png}
size=${3:-1400}
width=${size%%x*}
height=$([[ $size == *x* ]] && echo "${size#*x}" || true)
[[ $width =~ ^[0-9]+$ && ( -z $height || $height =~ ^[0-9]+$ ) ]] || { echo "size must be WIDTH or WIDTHxHEIGHT: $size" >&2; exit 1; }
[[ -d $target ]] && target=$target/index.html
[[ -f $target ]] || { echo "no such report: $target" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[[ -n $browser ]] || { echo "Chromium not found: apt-get install -y chromium" >&2; exit 1; }

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
url="file://$(realpath "$target")"
out=$(realpath -m "$out")
rm -f "$out"
run_browser() {
  "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$profile/profile" "$@"
}

if [[ -z $height ]]; then  # measure the page laid out at this width
  probe=$profile/measure.html
  sed 's#</body>#<script>addEventListener("load",function(){document.title="page-height:"+Math.ceil(document.documentElement.scrollHeight)})</script></body>#' \
    "$target" >"$probe"
  height=$(run_browser --window-size="$width,900" --dump-dom "file://$probe" 2>/dev/null \
    | grep -o '<title>page-height:[0-9]*' | grep -o '[0-9]*$' || true)
  [[ -n $height ]] || { height=8000; echo "could not measure the page; using height $height" >&2; }
fi

run_browser --screenshot="$out" --window-size="$width,$height" "$url" 2>&1 \
  | { grep -v -e dbus -e Fontconfig -e 'unexpected operator' -e 'bytes written' || true; }
[[ -s $out ]] || { echo "Chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $out (${width}x$height, $(du -k "$out" | cut -f1) KiB)"
