#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: exact
# and repeatable on a shared, noisy machine where times are not.
#
#   bash benches/instructions.sh [BINARY]     # default: target/release/portcullis
#
# Runs the proxy under callgrind twice, with the same keep-alive client
# sending N1 and then N2 plain-HTTP requests through it to a loopback origin
# (Python, keep-alive, 13-byte body), and reports
#   (Ir(N2) - Ir(N1)) / (N2 - N1)
# so start-up, config compilation and shutdown cancel out. Also writes the
# N2 profile for `callgrind_annotate`. Loopback only; bounded in count.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
BIN="${1:-target/release/portcullis}"
[ "$BIN" != target/release/portcullis ] || cargo build --release --locked --bin portcullis
N1="${N1:-200}"
N2="${N2:-2200}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"

cat > "$OUT/origin.py" <<'PY'
import http.server, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"hello, world\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
s = S(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
PY
cat > "$OUT/client.py" <<'PY'
import socket, sys, time
proxy, origin, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 30
while True:
    try:
        s = socket.create_connection(("127.0.0.1", proxy)); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.2)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
s.settimeout(30)
req = (f"GET http://127.0.0.1:{origin}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
       "User-Agent: instructions-bench\r\nAccept: */*\r\n\r\n").encode()
f = s.makefile("rb")
for _ in range(n):
    s.sendall(req)
    status = f.readline()
    assert b" 200 " in status, status
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    f.read(length)
s.close()
PY

python3 "$OUT/origin.py" > "$OUT/origin.port" &
ORIGIN_PID=$!
trap 'kill $ORIGIN_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do [ -s "$OUT/origin.port" ] && break; sleep 0.1; done
ORIGIN=$(cat "$OUT/origin.port")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Ir of one run of the proxy serving N requests on one keep-alive connection.
run() {
  local n=$1 port; port=$(free_port)
  cat > "$OUT/proxy.yaml" <<YAML
listen: 127.0.0.1:$port
admin_listen: 127.0.0.1:0
allow_ranges: [127.0.0.1/32]
roles:
  default:
    allow:
      cidrs: [127.0.0.1/32]
      http_ports: [$ORIGIN]
YAML
  RUST_LOG=info valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$n" \
    "$BIN" run --config "$OUT/proxy.yaml" > /dev/null 2> "$OUT/valgrind.$n.log" &
  local vg=$!
  python3 "$OUT/client.py" "$port" "$ORIGIN" "$n"
  kill -TERM $vg
  wait $vg || true
  awk '/^summary:|^totals:/ {print $2; exit}' "$OUT/callgrind.$n"
}

A=$(run "$N1")
B=$(run "$N2")
echo "instructions: $A for $N1 requests, $B for $N2 requests"
echo "instructions per request: $(( (B - A) / (N2 - N1) ))"
echo "profile: callgrind_annotate $OUT/callgrind.$N2"
