#!/usr/bin/env bash
# The regression guard: the load bench (benches/proxy_load.rs, built from
# this working tree) against two builds of the proxy, in alternating passes
# on the same machine, each figure given as a ratio of new to old.
#
#   bash benches/compare.sh REV             # REV (old) against the working tree (new)
#   bash benches/compare.sh REV NEW_REV     # two revisions
#   PORTCULLIS_COMPARE_PASSES=5 bash benches/compare.sh aa67df1
#   PORTCULLIS_LOAD_ONLY=bulk bash benches/compare.sh aa67df1 HEAD   # some phases only
#
# Builds each revision's release `portcullis` binary from `git archive` in
# PORTCULLIS_COMPARE_DIR (default /tmp/portcullis-compare), one target
# directory shared by all revisions, and keeps the binary by commit, so a
# second run (or a bisect step) builds nothing. The working tree is built in
# its own target/. Then PORTCULLIS_COMPARE_PASSES (default 3) passes, each
# running the bench once against old and once against new (old, new, old,
# new, ...), all under one `flock /tmp/bench.lock` so no other bench
# overlaps or runs between them (PORTCULLIS_COMPARE_LOCK names another lock file).
#
# Every figure of a bench run is taken in that run: a ratio to the direct
# baseline measured in the same run (requests/s, latency, tunnels/s,
# throughput), or an absolute figure where there is no direct one (bytes
# of proxy RSS per idle tunnel, µs of proxy CPU per request). The table
# gives, per figure, the median and min-max over the passes of old and new,
# and of the per-pass ratio new/old; "better" says which way is better.
# A figure a revision cannot give (a phase failed) is n/a.
#
# Bench settings pass through (see benches/proxy_load.rs); the defaults here:
# PORTCULLIS_LOAD_ONLY=http,new,bulk,idle PORTCULLIS_LOAD_CLIENTS=1,50
# PORTCULLIS_LOAD_IDLE_TUNNELS=5000 (1 GiB bulk transfers, 3 s phases).
# The transparent and router phases are not compared (old revisions lack
# the transparent listener). One pass of both takes about two minutes.
# Loopback only; every bench phase is bounded in time and in count. A bench,
# never part of the test run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
passes=${PORTCULLIS_COMPARE_PASSES:-3}
dir=${PORTCULLIS_COMPARE_DIR:-/tmp/portcullis-compare}
export PORTCULLIS_LOAD_ONLY=${PORTCULLIS_LOAD_ONLY:-http,new,bulk,idle}
export PORTCULLIS_LOAD_CLIENTS=${PORTCULLIS_LOAD_CLIENTS:-1,50}
export PORTCULLIS_LOAD_IDLE_TUNNELS=${PORTCULLIS_LOAD_IDLE_TUNNELS:-5000}
export PORTCULLIS_LOAD_MACHINE=1
mkdir -p "$dir/bin" "$dir/src"

# The release binary of commit $1, built once and kept; its path on stdout.
build_rev() {
  local sha bin src
  sha=$(git rev-parse --verify "$1^{commit}")
  bin="$dir/bin/portcullis-$sha"
  if [ ! -x "$bin" ]; then
    src="$dir/src/$sha"
    rm -rf "$src"
    mkdir -p "$src"
    git archive "$sha" | tar -x -m -C "$src"
    echo "building $1 ($sha) in $src" >&2
    (cd "$src" && CARGO_TARGET_DIR="$dir/target" cargo build --release --locked --bin portcullis) >&2
    cp "$dir/target/release/portcullis" "$bin.tmp"
    mv "$bin.tmp" "$bin"
    rm -rf "$src"
  fi
  echo "$bin"
}

old_bin=$(build_rev "$1")
old_name=$(git rev-parse --short "$1^{commit}")
if [ $# -eq 2 ]; then
  new_bin=$(build_rev "$2")
  new_name=$(git rev-parse --short "$2^{commit}")
else
  echo "building the working tree" >&2
  cargo build --release --locked --bin portcullis >&2
  new_name="working tree ($(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ', modified'))"
  new_bin="$dir/bin/portcullis-worktree-$$"
  cp target/release/portcullis "$new_bin"
  trap 'rm -f "$new_bin"' EXIT
fi
bench=$(cargo bench --locked --no-run --bench proxy_load 2>&1 | sed -n 's/.*Executable .*(\(.*proxy_load-[0-9a-f]*\)).*/\1/p' | tail -1)
[ -x "$bench" ] || { echo "the proxy_load bench did not build" >&2; exit 1; }

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
out=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-compare-run.XXXXXX")
echo "old: $old_name; new: $new_name; $passes passes; open-file limit $(ulimit -n); bench output in $out" >&2
# The lock is held for all passes, so no other bench runs between them.
lock=${PORTCULLIS_COMPARE_LOCK:-/tmp/bench.lock}
exec 9>>"$lock"
echo "waiting for $lock" >&2
flock 9
for pass in $(seq "$passes"); do
  for side in old new; do
    bin=$old_bin
    [ "$side" = new ] && bin=$new_bin
    echo "pass $pass of $passes, $side: $(uptime | sed 's/.*load/load/')" >&2
    if ! PORTCULLIS_LOAD_BIN="$bin" "$bench" >"$out/$side.$pass.txt" 2>&1 9>&-; then
      echo "  the bench failed ($side, pass $pass): $(tail -1 "$out/$side.$pass.txt"); figures it did not print are n/a" >&2
    fi
  done
done
exec 9>&-

echo
echo "old: $old_name; new: $new_name; $passes passes, alternating"
echo
# One line per figure a run printed: side, pass, name, value.
for f in "$out"/*.txt; do
  base=$(basename "$f" .txt)
  awk -F'\t' -v run="${base%.*}" -v pass="${base#*.}" '$1 == "figure" { print run, pass, $2, $3 }' "$f"
done | awk -v passes="$passes" '
  function median_range(values, n,    i, j, t, mid) {
    for (i = 2; i <= n; i++) for (j = i; j > 1 && values[j - 1] > values[j]; j--) { t = values[j]; values[j] = values[j - 1]; values[j - 1] = t }
    mid = (n % 2) ? values[(n + 1) / 2] : (values[n / 2] + values[n / 2 + 1]) / 2
    return sprintf("%s (%s-%s)", fmt(mid), fmt(values[1]), fmt(values[n]))
  }
  function fmt(v) { return (v >= 100) ? sprintf("%.0f", v) : sprintf("%.2f", v) }
  function cell(side, name,    p, n, values) {
    n = 0
    for (p = 1; p <= passes; p++) if ((side, p, name) in value) values[++n] = value[side, p, name]
    return n ? median_range(values, n) : "n/a"
  }
  { printed[$3] = 1; if ($4 != "n/a") value[$1, $2, $3] = $4 + 0 }
  END {
    split("rps_1 p50_1 p99_1 switches_per_request_1 rps_50 p99_50 cpu_us_per_request_50 new_tunnels opaque_bulk opaque_bulk_cpu opaque_http_get opaque_http_get_cpu opaque_http_put opaque_http_put_cpu http_tunnel_get http_tunnel_get_cpu http_tunnel_put http_tunnel_put_cpu idle_opaque_bytes idle_http_tunnel_bytes", names, " ")
    label["rps_1"] = "requests/s, 1 client (x direct)"; better["rps_1"] = "higher"
    label["p50_1"] = "p50 latency, 1 client (x direct)"; better["p50_1"] = "lower"
    label["p99_1"] = "p99 latency, 1 client (x direct)"; better["p99_1"] = "lower"
    label["switches_per_request_1"] = "  proxy context switches/request"; better["switches_per_request_1"] = "lower"
    label["rps_50"] = "requests/s, 50 clients (x direct)"; better["rps_50"] = "higher"
    label["p99_50"] = "p99 latency, 50 clients (x direct)"; better["p99_50"] = "lower"
    label["cpu_us_per_request_50"] = "proxy CPU us/request, 50 clients"; better["cpu_us_per_request_50"] = "lower"
    label["new_tunnels"] = "new tunnels/s (x direct)"; better["new_tunnels"] = "higher"
    label["opaque_bulk"] = "opaque tunnel, bulk (x direct)"; better["opaque_bulk"] = "higher"
    label["opaque_http_get"] = "HTTP GET in opaque tunnel, bulk (x direct)"; better["opaque_http_get"] = "higher"
    label["opaque_http_put"] = "HTTP upload in opaque tunnel, bulk (x direct)"; better["opaque_http_put"] = "higher"
    label["opaque_http_put_cpu"] = "  proxy CPU us/MB"; better["opaque_http_put_cpu"] = "lower"
    label["http_tunnel_get"] = "HTTP-in-tunnel GET, bulk (x direct)"; better["http_tunnel_get"] = "higher"
    label["http_tunnel_put"] = "HTTP-in-tunnel upload, bulk (x direct)"; better["http_tunnel_put"] = "higher"
    label["opaque_bulk_cpu"] = "  proxy CPU us/MB"; better["opaque_bulk_cpu"] = "lower"
    label["opaque_http_get_cpu"] = "  proxy CPU us/MB"; better["opaque_http_get_cpu"] = "lower"
    label["http_tunnel_get_cpu"] = "  proxy CPU us/MB"; better["http_tunnel_get_cpu"] = "lower"
    label["http_tunnel_put_cpu"] = "  proxy CPU us/MB"; better["http_tunnel_put_cpu"] = "lower"
    label["idle_opaque_bytes"] = "idle opaque tunnel after a GET, bytes"; better["idle_opaque_bytes"] = "lower"
    label["idle_http_tunnel_bytes"] = "idle HTTP-in-tunnel after a GET, bytes"; better["idle_http_tunnel_bytes"] = "lower"
    printf "| %s | %s | %s | %s | %s |\n", "figure", "old", "new", "new/old", "better"
    printf "|---|---|---|---|---|\n"
    for (i = 1; i in names; i++) {
      name = names[i]
      n = 0
      delete ratios
      for (p = 1; p <= passes; p++)
        if (("old", p, name) in value && ("new", p, name) in value && value["old", p, name] != 0)
          ratios[++n] = value["new", p, name] / value["old", p, name]
      old = cell("old", name)
      new = cell("new", name)
      # A phase that did not run leaves no row.
      if (old == "n/a" && new == "n/a" && !((name) in printed)) continue
      printf "| %s | %s | %s | %s | %s |\n", label[name], old, new, n ? median_range(ratios, n) : "n/a", better[name]
    }
  }'
