# shellcheck shell=bash
# The mailrelay anchor for ../shared/bench/run_anchors.sh: sourced into a scratch copy of that script by
# bench/run.sh, so mailrelay is measured in the same run, with the same load generator and method as
# Postfix and Haraka. Uses the project's .venv; relays to the same smtp-sink (smarthost).

MR_ROOT=${MR_ROOT:?MR_ROOT must point at the mailrelay checkout}
MR_BIN=${MR_BIN:-$MR_ROOT/.venv/bin}
MR_SUB=5587     # STARTTLS + AUTH (submission)
MR_SMTPS=5465   # implicit TLS + AUTH (submissions)

# One process uses one core: MR_PROCS processes (default: one per core) share the ports through
# reusetcp: (SO_REUSEPORT) listeners and one database, each with its own data directory.
MR_PROCS=${MR_PROCS:-$(nproc)}

mailrelay_start() {
  local dir=$RUN_DIR/mailrelay i
  rm -rf "$dir"; mkdir -p "$dir"
  MR_PIDS=()
  for ((i = 0; i < MR_PROCS; i++)); do
    cat > "$dir/mailrelay-$i.toml" <<TOML
[server]
hostname = "relay.bench.local"
data_dir = "$dir/data-$i"
[listeners]
smtp = []
submission = ["reusetcp:$MR_SUB:interface=127.0.0.1"]
submissions = ["reusetcp:$MR_SMTPS:interface=127.0.0.1"]
http = []
[tls]
certificate = "$RUN_DIR/tls/cert.pem"
private_key = "$RUN_DIR/tls/key.pem"
[database]
url = "sqlite:///$dir/mailrelay.sqlite3"
[tracking]
secret = "bench-tracking-secret-shared-by-all-processes"
[smtp]
max_connections_per_ip = 1000
[delivery]
smarthost = "127.0.0.1:$SINK_PORT"
smarthost_tls = "none"
# The limit is per process: MR_PROCS x MR_CONCURRENCY connections to the sink in all. The default,
# 20 / MR_PROCS, makes it 20, as Postfix's smtp processes toward its relayhost
# (default_destination_concurrency_limit). Paired runs measured 10 x 2 against 50 x 2: the same e2e
# rate, about 10% more accepted (bench/README.md).
concurrency_per_destination = ${MR_CONCURRENCY:-$(( MR_PROCS >= 20 ? 1 : 20 / MR_PROCS ))}
TOML
  done
  local mr=("$MR_BIN/mailrelay" --config "$dir/mailrelay-0.toml")
  echo "$BENCH_PASS" | "${mr[@]}" account create "$BENCH_USER" > /dev/null
  "${mr[@]}" domain add "$BENCH_USER" "${SENDER#*@}" > /dev/null
  "${mr[@]}" domain verify "${SENDER#*@}" --force > /dev/null
  # MR_DKIM=off: the domain's mail goes unsigned, the same work as the peers' case b.
  [[ ${MR_DKIM:-on} == off ]] && "${mr[@]}" domain dkim "${SENDER#*@}" --off > /dev/null
  # MR_TRACKING=on: open and click tracking for every message (used with the HTML load).
  [[ ${MR_TRACKING:-off} == on ]] && "${mr[@]}" account set "$BENCH_USER" --open-tracking on --click-tracking on > /dev/null
  for ((i = 0; i < MR_PROCS; i++)); do
    # MR_TWISTD_ARGS: extra twistd options, e.g. "--profile=/tmp/mr.prof --profiler=cprofile --savestats".
    # shellcheck disable=SC2086
    "$MR_BIN/twistd" -n --pidfile= --logfile="$dir/twistd-$i.log" ${MR_TWISTD_ARGS:-} mailrelay --config "$dir/mailrelay-$i.toml" &
    MR_PIDS+=($!); STARTED_PIDS+=($!)
  done
  for ((i = 0; i < MR_PROCS; i++)); do
    local t
    for ((t = 0; t < 600; t++)); do [[ -s $dir/data-$i/listeners.json ]] && break; sleep 0.1; done
  done
  wait_port 127.0.0.1 $MR_SUB 60
}

mailrelay_stop() {
  local pid
  for pid in "${MR_PIDS[@]}"; do stop_pid "$pid" mailrelay; done
}

anchor_mailrelay() {
  log "== mailrelay $("$MR_BIN/python" -c 'import mailrelay; print(mailrelay.__version__)') ($MR_PROCS processes)"
  start_sink
  mailrelay_start || return 1
  SERVER_PIDS=("${MR_PIDS[@]}")
  local size
  for size in $SIZES; do
    cell mailrelay b "$size" $MR_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  cell mailrelay c465 1024 $MR_SMTPS "$PER_SESSION" --tls "${AUTHARGS[@]}"
  cell mailrelay b-m1 1024 $MR_SUB 1 --starttls "${AUTHARGS[@]}"
  mailrelay_stop
  stop_sink
}

# Postfix (+ Dovecot SASL + OpenDKIM) and the sink, up for a group of cells.
postfix_up() {
  postfix_configure
  start_sink
  postfix_start
  SERVER_PIDS=("$POSTFIX_PID" "$DOVECOT_PID" "$OPENDKIM_PID")
}

# The cells this project compares against, without the peers' other cases (plain, 1 msg/session,
# smtp-source cross-check): STARTTLS + AUTH (b) and STARTTLS + AUTH + DKIM (c), at every size.
anchor_postfix_bc() {
  log "== Anchor A (b, c): Postfix $(postconf -h mail_version) + Dovecot SASL + OpenDKIM"
  postfix_up
  local size
  for size in $SIZES; do
    cell postfix b "$size" $PF_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
    cell postfix c "$size" $PF_SUB_DKIM "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  postfix_stop
  stop_sink
}

# postfix_cells CASE PORT CELL: Postfix up, CELL (cell or html_cell) for CASE at every size, Postfix down.
postfix_cells() {
  local case=$1 port=$2 run=$3 size
  postfix_up
  for size in $SIZES; do
    "$run" postfix "$case" "$size" "$port" "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  postfix_stop
  stop_sink
}

# Postfix's b cell alone: the accepted-rate comparison (b0 / Postfix b) without the DKIM cells.
anchor_postfix_b() {
  log "== Anchor A (b): Postfix $(postconf -h mail_version) + Dovecot SASL"
  postfix_cells b $PF_SUB cell
}

# Paired runs for the accepted-rate ratio (mailrelay b0 / Postfix b): both servers up at once and their
# measured runs alternating (mailrelay, Postfix, Postfix, mailrelay, ...), so this machine's drift over
# minutes (up to 2x, see README.md) falls on both alike instead of on whichever anchor ran in a slow stretch.
#
# MR_SANDBOX=1 is a diagnostic bound, not a comparison of equal work: mailrelay's messages come From the
# sandbox domain, so it receives, checks, spools and records them but delivers none (case s0). It shows what
# mailrelay would accept if delivering cost nothing.
#
# PAIR_PIN=1 (with MR_PROCS=1 on a 2-core machine) gives the servers the last core and the load generator and
# the sink the others, so neither server shares its core with the load: the comparison of a machine where the
# load generator has cores of its own.
anchor_pair_b0() {
  log "== paired runs: mailrelay b0 ($MR_PROCS processes) and Postfix b, alternating"
  postfix_up
  MR_DKIM=off mailrelay_start || return 1
  local mr=("${MR_PIDS[@]}") pf=("$POSTFIX_PID" "$DOVECOT_PID" "$OPENDKIM_PID") size i runs=$RUNS
  local last=$(($(nproc) - 1))
  if [[ ${PAIR_PIN:-} == 1 ]]; then
    (( last >= 1 )) || { log "PAIR_PIN=1 needs at least two cores"; return 1; }
    pin_tree "$last" "${mr[@]}" "${pf[@]}"
    [[ -n ${SINK_PID:-} ]] && pin_tree "0-$((last - 1))" "$SINK_PID"
    taskset -p -c "0-$((last - 1))" $$ > /dev/null  # this runner, so every load generator it starts from now on
    log "pinned: servers on CPU $last, load generator and sink on CPU 0-$((last - 1))"
  fi
  local mrcase=b0 mrargs=() mrsink=${SINK_PID:-}
  if [[ ${MR_SANDBOX:-} == 1 ]]; then
    mrcase=s0 mrargs=(--mail-from bench@sandbox.mailrelay.test) mrsink=
  fi
  for size in $SIZES; do
    RUNS=0  # the warm-ups only
    SERVER_PIDS=("${mr[@]}"); SINK_PID=$mrsink cell mailrelay $mrcase "$size" $MR_SUB "$PER_SESSION" --starttls \
      "${AUTHARGS[@]}" "${mrargs[@]}"
    SERVER_PIDS=("${pf[@]}"); cell postfix b "$size" $PF_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
    RUNS=$runs
    for ((i = 1; i <= RUNS; i++)); do
      local order=(mailrelay postfix) a
      (( i % 2 == 0 )) && order=(postfix mailrelay)
      for a in "${order[@]}"; do
        if [[ $a == mailrelay ]]; then
          SERVER_PIDS=("${mr[@]}")
          SINK_PID=$mrsink run_load mailrelay $mrcase "$size" $MR_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}" \
            "${mrargs[@]}"
        else
          SERVER_PIDS=("${pf[@]}"); run_load postfix b "$size" $PF_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
        fi
      done
    done
  done
  mailrelay_stop
  postfix_stop
  stop_sink
  [[ ${PAIR_PIN:-} == 1 ]] && taskset -p -c "0-$last" $$ > /dev/null  # the anchors after this one run unpinned
  return 0
}

# pin_tree CPUS PID...: each process, every thread of it and every process under it, on CPUS (what they
# start later inherits it).
pin_tree() {
  local cpus=$1 pid child
  shift
  for pid in "$@"; do
    taskset -a -p -c "$cpus" "$pid" > /dev/null
    for child in $(pgrep -P "$pid"); do pin_tree "$cpus" "$child"; done
  done
}

anchor_haraka_bc() {
  log "== Anchor B (b, c): Haraka (nodes=$HARAKA_NODES)"
  [[ -x $HARAKA_BIN ]] || { log "Haraka not installed (run setup_deps.sh)"; return 1; }
  start_sink
  local case size
  for case in b c; do
    haraka_configure $case
    haraka_start || return 1
    SERVER_PIDS=("$HARAKA_PID")
    for size in $SIZES; do
      cell haraka $case "$size" $HARAKA_PORT "$PER_SESSION" --starttls "${AUTHARGS[@]}"
    done
    haraka_stop
  done
  stop_sink
}

# mailrelay_case CASE CELL: mailrelay (set up by MR_DKIM / MR_TRACKING) and the sink, CELL (cell or html_cell)
# for CASE at every size.
mailrelay_case() {
  local case=$1 run=$2 size
  log "== mailrelay ($case) $("$MR_BIN/python" -c 'import mailrelay; print(mailrelay.__version__)') ($MR_PROCS processes)"
  start_sink
  mailrelay_start || return 1
  SERVER_PIDS=("${MR_PIDS[@]}")
  for size in $SIZES; do
    "$run" mailrelay "$case" "$size" $MR_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  mailrelay_stop
  stop_sink
}

# b: mailrelay signs every copy (DKIM), so it is compared with the peers' b and c.
anchor_mailrelay_b() { mailrelay_case b cell; }
# b0: DKIM signing off for the domain: the same work as the peers' b.
anchor_mailrelay_b0() { MR_DKIM=off mailrelay_case b0 cell; }

# The HTML load (bench/htmlload.py: smtpload.py with a text/html body and a link per ~400 octets)
# for the "tracking on" cells: mailrelay rewrites every link and adds an open pixel (and signs);
# the peers relay the same messages with DKIM (their case c).
html_cell() {
  local saved=("${LOAD[@]}")
  LOAD=(env SMTPLOAD_DIR="$BENCH_DIR" "$PY" "$MR_ROOT/bench/htmlload.py")
  cell "$@"
  LOAD=("${saved[@]}")
}

# t: the HTML load with open and click tracking (and DKIM).
anchor_mailrelay_t() { MR_TRACKING=on mailrelay_case t html_cell; }

anchor_postfix_t() {
  log "== Postfix + OpenDKIM, HTML load (t)"
  postfix_cells t $PF_SUB_DKIM html_cell
}

anchor_haraka_t() {
  log "== Haraka + dkim plugin, HTML load (t)"
  [[ -x $HARAKA_BIN ]] || { log "Haraka not installed (run setup_deps.sh)"; return 1; }
  start_sink
  haraka_configure c
  haraka_start || return 1
  SERVER_PIDS=("$HARAKA_PID")
  local size
  for size in $SIZES; do
    html_cell haraka t "$size" $HARAKA_PORT "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  haraka_stop
  stop_sink
}
