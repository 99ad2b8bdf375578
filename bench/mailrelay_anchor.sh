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
