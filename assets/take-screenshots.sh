#!/usr/bin/env bash
# Screenshots of each tab from a real run of the app under Xvfb, for the README.
# Needs: xvfb xdotool imagemagick (apt-get install -y xvfb xdotool imagemagick) and a built app
# (cargo build). Clicks at fixed window coordinates of the 1280x820 layout.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/debug/inkspect}
OUT=${OUT:-assets}
export DISPLAY=:77
Xvfb "$DISPLAY" -screen 0 1280x820x24 >/dev/null 2>&1 &
XPID=$!
trap 'kill $APID $XPID 2>/dev/null || true' EXIT
sleep 1
"$BIN" 2>"$OUT/app-stderr.log" &
APID=$!
WID=$(xdotool search --sync --name "Inkspect" | head -1)
xdotool windowmove "$WID" 0 0 windowsize "$WID" 1280 820
sleep 6
shot() { import -window root "$OUT/$1"; echo "wrote $OUT/$1"; }
click() { xdotool mousemove "$1" "$2" click 1; sleep "${3:-1}"; }
shot screenshot-dataset.png
click 150 38 2            # "2 Training"
click 35 211 50           # "Train": a live training on the demo images
shot screenshot-training.png
click 99 211 3            # "Cancel": the previous (bundled) model stays
click 255 38 2            # "3 Evaluation"
click 48 111 20           # "Run model"
click 70 150 5            # first (highest-scoring) image
shot screenshot-evaluation.png
xdotool key --window "$WID" ctrl+q >/dev/null 2>&1 || true
kill "$APID" 2>/dev/null || true
wait "$APID" 2>/dev/null || true
cat "$OUT/app-stderr.log"
