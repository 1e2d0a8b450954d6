#!/usr/bin/env bash
# The peer comparison in one command: Squid and tinyproxy (Debian packages,
# installed with apt-get when missing) measured in the same load-bench run
# as Portcullis and the direct baseline.
#
#   bash benches/peers.sh                          # 3 passes, 3 s phases
#   PORTCULLIS_LOAD_PASSES=5 PORTCULLIS_LOAD_PHASE_MS=2000 bash benches/peers.sh
#   PORTCULLIS_PEERS_KEEP=1 bash benches/peers.sh    # keep configs and logs
#   PORTCULLIS_PEERS_G3PROXY=/path/to/g3proxy bash benches/peers.sh   # g3proxy too
#
# g3proxy is in no package registry: build it yourself from its source
# (github.com/bytedance/g3, `cargo build --release -p g3proxy
# --no-default-features --features rustls-ring`, which needs libssl-dev and
# capnproto) and name the binary. It gets a config equivalent to the others
# (its default runtime, a thread per core; the task log to a file; only
# the origin's address and ports admitted).
#
# Each peer gets a config of its own in a temporary directory: loopback
# listener on a free port, only the bench's origin (127.0.0.1, three fixed
# ports, CONNECT allowed to them) admitted, no caching, an access log to a
# file (Portcullis's log goes to a file too). The directory is on tmpfs
# (/dev/shm) where there is one: tinyproxy fsyncs every log line, and the
# bench compares proxies, not this machine's shared disk. Peers run as their
# package's unprivileged user when this script runs as root; they are
# stopped on exit.
# Loopback only; every bench phase is bounded in time and in count.
# Figures are ratios to direct within one pass, medians over the passes with
# the min-max spread (see benches/proxy_load/peers.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

missing=()
for pkg in squid tinyproxy; do
  dpkg-query -W -f='${Status}\n' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
nofile=$(ulimit -n)
echo "open-file limit: $nofile"

# Ports below the ephemeral range, not listening now, not picked before.
picked=" "
free_port() {
  local port
  for _ in $(seq 200); do
    port=$((20000 + RANDOM % 12000))
    [[ $picked == *" $port "* ]] && continue
    if [ -z "$(ss -Htln "sport = :$port")" ]; then
      picked+="$port "
      PORT=$port
      return
    fi
  done
  echo "no free port found" >&2
  return 1
}
free_port; http_port=$PORT
free_port; echo_port=$PORT
free_port; source_port=$PORT
free_port; squid_port=$PORT
free_port; tinyproxy_port=$PORT
free_port; g3proxy_port=$PORT
g3proxy=${PORTCULLIS_PEERS_G3PROXY:-}
if [ -n "$g3proxy" ] && [ ! -x "$g3proxy" ]; then
  echo "PORTCULLIS_PEERS_G3PROXY: $g3proxy is not an executable" >&2
  exit 2
fi

logs_on=/tmp
[ -d /dev/shm ] && [ -w /dev/shm ] && logs_on=/dev/shm
dir=$(mktemp -d "$logs_on/portcullis-peers.XXXXXX")
chmod 755 "$dir"
mkdir "$dir/squid" "$dir/tinyproxy" "$dir/g3proxy"
pids=()
stop_peers() {
  # A bench killed from outside leaves its Portcullis running: it is the
  # process whose standard output is our log file.
  for out in /proc/[0-9]*/fd/1; do
    [ "$(readlink "$out" 2>/dev/null)" = "$dir/portcullis.log" ] || continue
    pid=${out#/proc/}
    pids+=("${pid%%/*}")
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  for log in "$dir/squid/access.log" "$dir/tinyproxy/tinyproxy.log" "$dir/g3proxy/stdout.log" "$dir/portcullis.log"; do
    [ -f "$log" ] && echo "log lines: $(wc -l <"$log") in $log"
  done
  if [ -n "${PORTCULLIS_PEERS_KEEP:-}" ]; then
    echo "configs and logs kept in $dir"
  else
    rm -rf "$dir"
  fi
}
trap stop_peers EXIT
trap 'exit 130' INT TERM

cat >"$dir/squid/squid.conf" <<EOF
http_port 127.0.0.1:$squid_port
workers 1
visible_hostname localhost
pid_filename none
coredump_dir $dir/squid
cache_log stdio:$dir/squid/cache.log
access_log stdio:$dir/squid/access.log
logfile_rotate 0
cache deny all
cache_mem 0 MB
max_filedescriptors $nofile
shutdown_lifetime 1 seconds
pinger_enable off
# The bench uses IP literals; should anything be resolved, it stays on loopback.
dns_nameservers 127.0.0.1
acl origin dst 127.0.0.1/32
acl bench_ports port $http_port $echo_port $source_port
acl CONNECT method CONNECT
http_access allow localhost origin bench_ports
http_access deny all
EOF

cat >"$dir/tinyproxy/tinyproxy.conf" <<EOF
Port $tinyproxy_port
Listen 127.0.0.1
Timeout 600
LogFile "$dir/tinyproxy/tinyproxy.log"
LogLevel Info
MaxClients 6000
Allow 127.0.0.1
ConnectPort $http_port
ConnectPort $echo_port
ConnectPort $source_port
EOF

cat >"$dir/g3proxy/g3proxy.yaml" <<EOF
---
log: stdout
server:
  - name: bench
    type: http_proxy
    escaper: direct
    listen:
      address: 127.0.0.1:$g3proxy_port
    dst_host_filter_set:
      subnet_match:
        default: forbid
        permit: 127.0.0.1/32
    dst_port_filter:
      default: forbid
      permit: [$http_port, $echo_port, $source_port]
resolver:
  - name: default
    type: hickory
    server: 127.0.0.1
escaper:
  - name: direct
    type: direct_fixed
    resolver: default
    resolve_strategy: IPv4Only
    egress_network_filter:
      default: forbid
      allow: 127.0.0.1/32
EOF

# Squid drops to its cache_effective_user (proxy) by itself; tinyproxy is
# told whom to run as.
if [ "$(id -u)" = 0 ]; then
  chown proxy: "$dir/squid"
  chown tinyproxy: "$dir/tinyproxy"
  printf 'User tinyproxy\nGroup tinyproxy\n' >>"$dir/tinyproxy/tinyproxy.conf"
fi

squid -N -f "$dir/squid/squid.conf" >"$dir/squid/stdout.log" 2>&1 &
squid_pid=$!
pids+=("$squid_pid")
tinyproxy -d -c "$dir/tinyproxy/tinyproxy.conf" >"$dir/tinyproxy/stdout.log" 2>&1 &
tinyproxy_pid=$!
pids+=("$tinyproxy_pid")
peers="squid=127.0.0.1:$squid_port:$squid_pid;tinyproxy=127.0.0.1:$tinyproxy_port:$tinyproxy_pid"
if [ -n "$g3proxy" ]; then
  "$g3proxy" -c "$dir/g3proxy/g3proxy.yaml" -C "$dir/g3proxy" -G bench >"$dir/g3proxy/stdout.log" 2>&1 &
  g3proxy_pid=$!
  pids+=("$g3proxy_pid")
  peers+=";g3proxy=127.0.0.1:$g3proxy_port:$g3proxy_pid"
fi

# Waits until $2 accepts connections, or fails if process $3 exits or 30 s pass.
wait_listening() {
  local name=$1 port=$2 pid=$3
  for _ in $(seq 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited at start:" >&2
      cat "$dir/$name"/*.log >&2 || true
      return 1
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return
    sleep 0.1
  done
  echo "$name does not listen on $port after 30 s" >&2
  return 1
}
wait_listening squid "$squid_port" "$squid_pid"
wait_listening tinyproxy "$tinyproxy_port" "$tinyproxy_pid"
[ -z "$g3proxy" ] || wait_listening g3proxy "$g3proxy_port" "$g3proxy_pid"

echo "$(squid -v | sed -n 1p); $(tinyproxy -v); $(rustc -V)${g3proxy:+; $("$g3proxy" -V)}"
cargo build --release --locked --bin portcullis
echo "load before the bench: $(uptime)"
PORTCULLIS_LOAD_PEERS="$peers" \
PORTCULLIS_LOAD_ORIGIN_PORTS="$http_port,$echo_port,$source_port" \
PORTCULLIS_LOAD_PROXY_LOG="$dir/portcullis.log" \
  cargo bench --locked --bench proxy_load
echo "load after the bench: $(uptime)"
