# Sourced by scripts/demo and scripts/image-test: free loopback ports, waiting with a deadline,
# and a Mosquitto and a tansu of their own in $work, each PID added to `pids` (the caller's
# trap stops them).

free_port() {
  local port
  while :; do
    port=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return; fi
  done
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "$(basename "$0"): $what did not happen in time" >&2; exit 1; fi
    sleep 0.2
  done
}

# Sets mqtt_port and kafka_port.
start_brokers() {
  mqtt_port=$(free_port); kafka_port=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\nlog_dest file %s\n' \
    "$mqtt_port" "$work/mosquitto.log" > "$work/mosquitto.conf"
  /usr/sbin/mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.out" 2>&1 & pids+=($!)
  tansu broker --listener-url "tcp://127.0.0.1:$kafka_port" \
    --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
    --storage-engine memory://tansu/ >"$work/tansu.log" 2>&1 & pids+=($!)
  wait_for 20 "mosquitto listening" bash -c "exec 3<>/dev/tcp/127.0.0.1/$mqtt_port"
  wait_for 20 "tansu listening" bash -c "exec 3<>/dev/tcp/127.0.0.1/$kafka_port"
}
