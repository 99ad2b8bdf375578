#!/usr/bin/env bash
# Measure mailrelay side by side with Postfix (+ Dovecot SASL + OpenDKIM) and Haraka on this machine.
#
#   sudo bench/run.sh                      # mailrelay, postfix and haraka, 3 runs per cell
#   RUNS=1 DURATION=8 SIZES=1024 bench/run.sh mailrelay postfix
#   bench/run.sh mailrelay_b postfix_bc haraka_bc      # only the STARTTLS+AUTH (b) and +DKIM (c) cells
#
# It copies ../shared/bench (read-only) to $WORK, installs the peers there once (setup_deps.sh: Debian
# packages, Haraka from npm), adds the mailrelay anchor (bench/mailrelay_anchor.sh) to the copy of
# run_anchors.sh, runs the anchors in one session and prints the table and mailrelay's ratios to each peer.
# Everything runs on 127.0.0.1, bounded in time and count; servers are stopped by PID.
set -euo pipefail
MR_ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${SHARED:-$MR_ROOT/../shared/bench}
WORK=${WORK:-/tmp/mailrelay-bench}
export MR_ROOT

if [[ ! -f $WORK/run_anchors.sh ]]; then
  rm -rf "$WORK"; cp -r "$SHARED" "$WORK"; chmod -R u+w "$WORK"
fi
if ! command -v smtp-sink > /dev/null || [[ ! -x $WORK/.venv/bin/python ]] || [[ ! -d /tmp/haraka-inst ]]; then
  (cd "$WORK" && ./setup_deps.sh)
fi
[[ -x $MR_ROOT/.venv/bin/twistd ]] || "$MR_ROOT/scripts/setup-dev"

# The scratch runner: the shared script plus the mailrelay anchor, sourced before its main loop.
sed "s|^make_tls_cert$|source \"$MR_ROOT/bench/mailrelay_anchor.sh\"\nmake_tls_cert|" \
  "$WORK/run_anchors.sh" > "$WORK/run_with_mailrelay.sh"
chmod +x "$WORK/run_with_mailrelay.sh"
anchors=${*:-"mailrelay postfix haraka"}
before=$(ls "$WORK"/results/raw-*.jsonl 2>/dev/null | sort | tail -n 1 || true)
(cd "$WORK" && ./run_with_mailrelay.sh $anchors)
raw=$(ls "$WORK"/results/raw-*.jsonl | sort | tail -n 1)
[[ "$raw" != "$before" ]] || { echo "no new results" >&2; exit 1; }
mkdir -p "$MR_ROOT/bench/results"
cp "$raw" "$MR_ROOT/bench/results/"
"$WORK/.venv/bin/python" "$MR_ROOT/bench/ratios.py" "$raw" | tee "$MR_ROOT/bench/results/ratios-$(basename "$raw" .jsonl).md"
