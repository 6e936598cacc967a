#!/usr/bin/env bash
# The main job: set up (idempotently), then the closest real end-to-end run we can do without trained
# weights, then summarise and replay it. See `dsv4-agent run --demo` (agent/demo.py) for what is real.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
AGENT=.venv/bin/dsv4-agent
OUT="${DSV4_DEMO_OUT:-runs/demo}"

echo
echo "== 1/3  dsv4-agent run --demo"
$AGENT run --demo -o "$OUT"

echo
echo "== 2/3  dsv4-agent inspect last"
$AGENT inspect last -o "$OUT"

echo
echo "== 3/3  dsv4-agent replay last   (the recorded tokens again, on the scripted backend)"
$AGENT replay last -o "$OUT"
