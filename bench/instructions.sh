#!/usr/bin/env bash
# Instructions per message: one mailrelay process under callgrind, a fixed load, a deterministic count.
#
#   bench/instructions.sh [MESSAGES] [SIZE]          # default 300 messages of 1 KB (~2.5 min)
#   MR_SRC=/tmp/other-checkout bench/instructions.sh  # the same, for another tree's mailrelay package
#   BIN=/tmp/venv313/bin bench/instructions.sh       # the same, under another venv's Python
#   MODE=threads bench/instructions.sh 10000         # no valgrind: CPU time per message of each thread
#
# Rates on these machines drift by 2x within minutes; callgrind's instruction count does not (two runs of
# the same tree agree within about 1%), so it is the measure for comparing two versions of the code.
# What is counted: the process's user-space instructions in all its threads (not the kernel's), from
# after a warm-up of 100 messages until the sink has every message: receiving (STARTTLS, AUTH PLAIN,
# 10 sessions) and delivering to smtp-sink, DKIM off (the b0 cell's work).
# MODE=threads runs the process as it is and reads each thread's user and system time from /proc before
# and after the measured load (50 sessions): the reactor thread against the database, fsync and other pools.
# Needs valgrind (not for MODE=threads), smtp-sink and the shared smtpload.py with its venv: run bench/run.sh
# once before.
set -euo pipefail
N=${1:-300}
SIZE=${2:-1024}
MODE=${MODE:-callgrind}
MR_ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/mailrelay-bench}
BIN=${BIN:-$MR_ROOT/.venv/bin}  # another venv (another Python) with mailrelay installed
LOADPY=$WORK/.venv/bin/python
SUB=5590
SINK=5591
DIR=$(mktemp -d /tmp/mailrelay-instructions.XXXXXX)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2> /dev/null || true; wait 2> /dev/null || true; }
trap cleanup EXIT

if [[ $MODE == callgrind ]]; then
  command -v valgrind > /dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
fi
[[ -x $LOADPY && -f $WORK/smtpload.py ]] || { echo "no load generator in $WORK: run bench/run.sh once" >&2; exit 1; }
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=relay.bench.local \
  -keyout "$DIR/key.pem" -out "$DIR/cert.pem" 2> /dev/null

smtp-sink -4 -c -u nobody -m 1000 127.0.0.1:$SINK 1024 > "$DIR/sink.out" 2>&1 &
PIDS+=($!)
cat > "$DIR/mailrelay.toml" << TOML
[server]
hostname = "relay.bench.local"
data_dir = "$DIR/data"
[listeners]
smtp = []
submission = ["tcp:$SUB:interface=127.0.0.1"]
submissions = []
http = []
[tls]
certificate = "$DIR/cert.pem"
private_key = "$DIR/key.pem"
[database]
url = "sqlite:///$DIR/mailrelay.sqlite3"
[tracking]
secret = "bench-tracking-secret"
[smtp]
max_connections_per_ip = 1000
[delivery]
smarthost = "127.0.0.1:$SINK"
smarthost_tls = "none"
concurrency_per_destination = 10
TOML
mr=(env PYTHONPATH="${MR_SRC:-}" "$BIN/mailrelay" --config "$DIR/mailrelay.toml")
echo benchpass | "${mr[@]}" account create bench > /dev/null
"${mr[@]}" domain add bench bench.example > /dev/null
"${mr[@]}" domain verify bench.example --force > /dev/null
"${mr[@]}" domain dkim bench.example --off > /dev/null

twistd=("$BIN/python" "$BIN/twistd" -n --pidfile= --logfile="$DIR/twistd.log" mailrelay --config "$DIR/mailrelay.toml")
if [[ $MODE == threads ]]; then
  PYTHONPATH="${MR_SRC:-}" "${twistd[@]}" > "$DIR/twistd.out" 2>&1 &
else
  # --fair-sched: without it, valgrind's thread scheduling can starve the reactor thread for minutes.
  PYTHONPATH="${MR_SRC:-}" valgrind --tool=callgrind --fair-sched=yes --callgrind-out-file="$DIR/callgrind.out" \
    "${twistd[@]}" > "$DIR/valgrind.log" 2>&1 &
fi
VG=$!
PIDS+=($VG)
for ((t = 0; t < 1800; t++)); do [[ -s $DIR/data/listeners.json ]] && break; sleep 0.1; done

sessions=10
[[ $MODE == threads ]] && sessions=50
load() {
  "$LOADPY" "$WORK/smtpload.py" -p $SUB -c $sessions --per-session 100 -n "$1" --size "$SIZE" --uvloop --starttls \
    --auth plain -u bench -w benchpass --mail-from sender@bench.example --rcpt rcpt@example.com \
    --timeout 300 -q --json "$DIR/load.json" > /dev/null
}
delivered() { tr '\r' '\n' < "$DIR/sink.out" | grep -a 'mesg=' | tail -n 1 | sed -n 's/.*mesg=\([0-9]*\).*/\1/p'; }
wait_sink() { while (( $(delivered || echo 0) < $1 )); do sleep 0.2; done; }

# Each thread's "tid utime stime" (clock ticks); a pool thread may end between the listing and the read.
cpu_times() {
  for t in /proc/$VG/task/*; do
    read -ra f < <(sed 's/.*) //' "$t/stat" 2> /dev/null) || continue
    echo "${t##*/} ${f[11]} ${f[12]}"
  done
}

load 100
wait_sink 100
if [[ $MODE == threads ]]; then cpu_times > "$DIR/cpu.before"; else callgrind_control -z $VG > /dev/null 2>&1; fi
load "$N"
wait_sink $((100 + N))
sleep 1
ok=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ok'])" "$DIR/load.json")
if [[ $MODE == threads ]]; then
  cpu_times > "$DIR/cpu.after"
  python3 - "$DIR" "$ok" "$VG" "$(getconf CLK_TCK)" << 'PY'
import sys
d, ok, main, hz = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def read(name):
    return {t: (int(u), int(s)) for t, u, s in (line.split() for line in open(f"{d}/{name}"))}
before, after = read("cpu.before"), read("cpu.after")
us = 1e6 / hz / ok
total = [0.0, 0.0]
for tid, (u, s) in sorted(after.items(), key=lambda kv: -sum(kv[1])):
    u0, s0 = before.get(tid, (0, 0))
    du, ds = (u - u0) * us, (s - s0) * us
    total = [total[0] + du, total[1] + ds]
    if du + ds >= 1:
        name = "reactor" if tid == main else f"thread {tid}"
        print(f"{name:>14}: {du + ds:7.1f} us per message ({du:.1f} user, {ds:.1f} system)")
print(f"{'all threads':>14}: {sum(total):7.1f} us per message ({total[0]:.1f} user, {total[1]:.1f} system); "
      f"{ok} messages; {d}")
PY
  exit 0
fi
callgrind_control -d $VG > /dev/null 2>&1
total=$(callgrind_annotate "$DIR/callgrind.out.1" 2> /dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "instructions per message: $((total / ok))  ($total for $ok messages of $SIZE bytes; $DIR)"
