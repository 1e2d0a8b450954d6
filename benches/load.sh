#!/usr/bin/env bash
# The load benchmark in one command: builds the release proxy, raises the
# open-file limit (10,000 idle tunnels need about 40,000 descriptors across
# the proxy and the load generator), then runs it. Loopback only; every
# phase is bounded in time. As root, the bench runs in a network namespace
# of its own (unshare -n) so it can measure the transparent path too.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin portcullis
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
echo "open-file limit: $(ulimit -n)"
cargo bench --locked --bench proxy_load
