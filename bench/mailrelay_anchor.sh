# shellcheck shell=bash
# The mailrelay anchor for ../shared/bench/run_anchors.sh: sourced into a scratch copy of that script by
# bench/run.sh, so mailrelay is measured in the same run, with the same load generator and method as
# Postfix and Haraka. Uses the project's .venv; relays to the same smtp-sink (smarthost).

MR_ROOT=${MR_ROOT:?MR_ROOT must point at the mailrelay checkout}
MR_BIN=${MR_BIN:-$MR_ROOT/.venv/bin}
MR_SUB=5587     # STARTTLS + AUTH (submission)
MR_SMTPS=5465   # implicit TLS + AUTH (submissions)

mailrelay_start() {
  local dir=$RUN_DIR/mailrelay
  rm -rf "$dir"; mkdir -p "$dir"
  cat > "$dir/mailrelay.toml" <<TOML
[server]
hostname = "relay.bench.local"
data_dir = "$dir/data"
[listeners]
smtp = []
submission = ["tcp:$MR_SUB:interface=127.0.0.1"]
submissions = ["tcp:$MR_SMTPS:interface=127.0.0.1"]
http = []
[tls]
certificate = "$RUN_DIR/tls/cert.pem"
private_key = "$RUN_DIR/tls/key.pem"
[smtp]
max_connections_per_ip = 1000
[delivery]
smarthost = "127.0.0.1:$SINK_PORT"
smarthost_tls = "none"
# Postfix relays with up to 20 smtp processes to its relayhost, Haraka with up to 100 outbound
# connections (concurrency_max); 50 sits between them.
concurrency_per_destination = 50
TOML
  local mr=("$MR_BIN/mailrelay" --config "$dir/mailrelay.toml")
  echo "$BENCH_PASS" | "${mr[@]}" account create "$BENCH_USER" > /dev/null
  "${mr[@]}" domain add "$BENCH_USER" "${SENDER#*@}" > /dev/null
  "${mr[@]}" domain verify "${SENDER#*@}" --force > /dev/null
  "$MR_BIN/twistd" -n --pidfile= --logfile="$dir/twistd.log" mailrelay --config "$dir/mailrelay.toml" &
  MR_PID=$!; STARTED_PIDS+=("$MR_PID")
  wait_port 127.0.0.1 $MR_SUB 60
}

anchor_mailrelay() {
  log "== mailrelay $("$MR_BIN/python" -c 'import mailrelay; print(mailrelay.__version__)') (1 process)"
  start_sink
  mailrelay_start || return 1
  SERVER_PIDS=("$MR_PID")
  local size
  for size in $SIZES; do
    cell mailrelay b "$size" $MR_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  cell mailrelay c465 1024 $MR_SMTPS "$PER_SESSION" --tls "${AUTHARGS[@]}"
  cell mailrelay b-m1 1024 $MR_SUB 1 --starttls "${AUTHARGS[@]}"
  stop_pid "$MR_PID" mailrelay
  stop_sink
}

# The cells this project compares against, without the peers' other cases (plain, 1 msg/session,
# smtp-source cross-check): STARTTLS + AUTH (b) and STARTTLS + AUTH + DKIM (c), at every size.
anchor_postfix_bc() {
  log "== Anchor A (b, c): Postfix $(postconf -h mail_version) + Dovecot SASL + OpenDKIM"
  postfix_configure
  start_sink
  postfix_start
  SERVER_PIDS=("$POSTFIX_PID" "$DOVECOT_PID" "$OPENDKIM_PID")
  local size
  for size in $SIZES; do
    cell postfix b "$size" $PF_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
    cell postfix c "$size" $PF_SUB_DKIM "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  postfix_stop
  stop_sink
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

anchor_mailrelay_b() {  # mailrelay signs every copy (DKIM), so its b is compared with the peers' b and c
  log "== mailrelay (b) $("$MR_BIN/python" -c 'import mailrelay; print(mailrelay.__version__)') (1 process)"
  start_sink
  mailrelay_start || return 1
  SERVER_PIDS=("$MR_PID")
  local size
  for size in $SIZES; do
    cell mailrelay b "$size" $MR_SUB "$PER_SESSION" --starttls "${AUTHARGS[@]}"
  done
  stop_pid "$MR_PID" mailrelay
  stop_sink
}
