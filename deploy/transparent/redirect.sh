#!/bin/sh
# Sends every TCP connection that leaves this network namespace to
# Portcullis's transparent listener, and drops UDP except DNS to the
# resolvers named below. Run it once per network namespace (a pod, a
# compose service's namespace) before the workload starts, as root or with
# CAP_NET_ADMIN (+ CAP_NET_RAW for iptables). Running it again replaces
# the rules it installed.
#
# Used unmodified by the Kubernetes init container
# (deploy/kubernetes/transparent-sidecar/), the compose variant
# (deploy/compose/docker-compose.transparent.yml) and tests/transparent.rs.
#
# Settings (environment):
#   PORTCULLIS_TRANSPARENT_PORT  port of `transparent_listen` (default 15001)
#   PORTCULLIS_UID               uid Portcullis runs as; its own connections
#                                are not redirected (default 65532)
#   PORTCULLIS_EXCLUDE           TCP destinations left alone: addresses or
#                                CIDRs, IPv4 or IPv6, separated by spaces or
#                                commas (e.g. the API server). Default none.
#   PORTCULLIS_DNS_RESOLVERS     resolver addresses that may be asked over
#                                UDP and TCP port 53 (e.g. the node-local
#                                cache or kube-dns). Default none: no DNS.
#   PORTCULLIS_BACKEND           iptables | nft | auto (default auto:
#                                iptables when it works here, else nft)
#
# What stays direct: the exempt uid, loopback (127.0.0.0/8, ::1), the
# exclusions, and TCP DNS to the resolvers. TCP packets conntrack finds
# INVALID are dropped, so none leaves untranslated. Everything else on TCP, IPv4
# and IPv6, reaches Portcullis, which decides it with the same policy as
# the explicit proxy. UDP is dropped, so QUIC/HTTP3 clients fall back to
# TCP (they do: browsers, curl, and HTTP libraries retry over TCP/TLS).
# Other IP protocols (ICMP, SCTP, ...) are not touched.
set -eu

PORT="${PORTCULLIS_TRANSPARENT_PORT:-15001}"
PROXY_UID="${PORTCULLIS_UID:-65532}"
EXCLUDE="$(printf '%s' "${PORTCULLIS_EXCLUDE:-}" | tr ',' ' ')"
RESOLVERS="$(printf '%s' "${PORTCULLIS_DNS_RESOLVERS:-}" | tr ',' ' ')"
BACKEND="${PORTCULLIS_BACKEND:-auto}"

fail() {
    echo "redirect.sh: $*" >&2
    exit 1
}

case "$PORT" in '' | *[!0-9]*) fail "PORTCULLIS_TRANSPARENT_PORT must be a port number, not '$PORT'" ;; esac
case "$PROXY_UID" in '' | *[!0-9]*) fail "PORTCULLIS_UID must be a numeric uid, not '$PROXY_UID'" ;; esac

# IPv6 rules are required whenever the namespace has IPv6 at all: a
# namespace where only IPv4 is redirected leaks every IPv6 connection.
has_ipv6() {
    [ -e /proc/net/if_inet6 ]
}

is_v6() {
    case "$1" in *:*) return 0 ;; *) return 1 ;; esac
}

# --- iptables / ip6tables ----------------------------------------------

# $1: iptables or ip6tables; $2: the loopback range of that family.
iptables_family() {
    ipt="$1"
    loopback="$2"
    # The chains are ours: create them if missing, empty them if present.
    $ipt -w -t nat -N PORTCULLIS_OUTPUT 2>/dev/null || $ipt -w -t nat -F PORTCULLIS_OUTPUT
    $ipt -w -t filter -N PORTCULLIS_UDP 2>/dev/null || $ipt -w -t filter -F PORTCULLIS_UDP
    $ipt -w -t nat -C OUTPUT -p tcp -j PORTCULLIS_OUTPUT 2>/dev/null ||
        $ipt -w -t nat -A OUTPUT -p tcp -j PORTCULLIS_OUTPUT
    $ipt -w -t filter -C OUTPUT -p udp -j PORTCULLIS_UDP 2>/dev/null ||
        $ipt -w -t filter -A OUTPUT -p udp -j PORTCULLIS_UDP
    # NAT applies per connection; a TCP packet conntrack calls INVALID (out
    # of window, say) would leave untranslated, to the original address.
    $ipt -w -t filter -C OUTPUT -p tcp -m conntrack --ctstate INVALID -j DROP 2>/dev/null ||
        $ipt -w -t filter -A OUTPUT -p tcp -m conntrack --ctstate INVALID -j DROP

    $ipt -w -t nat -A PORTCULLIS_OUTPUT -m owner --uid-owner "$PROXY_UID" -j RETURN
    $ipt -w -t nat -A PORTCULLIS_OUTPUT -d "$loopback" -j RETURN
    $ipt -w -t filter -A PORTCULLIS_UDP -d "$loopback" -j RETURN
    for dst in $EXCLUDE; do
        family_matches "$ipt" "$dst" || continue
        $ipt -w -t nat -A PORTCULLIS_OUTPUT -d "$dst" -j RETURN
    done
    for dst in $RESOLVERS; do
        family_matches "$ipt" "$dst" || continue
        $ipt -w -t nat -A PORTCULLIS_OUTPUT -d "$dst" -p tcp --dport 53 -j RETURN
        $ipt -w -t filter -A PORTCULLIS_UDP -d "$dst" -p udp --dport 53 -j RETURN
    done
    $ipt -w -t nat -A PORTCULLIS_OUTPUT -p tcp -j REDIRECT --to-ports "$PORT"
    $ipt -w -t filter -A PORTCULLIS_UDP -j DROP
}

# True when address/CIDR $2 belongs to the family of command $1.
family_matches() {
    if is_v6 "$2"; then [ "$1" = ip6tables ]; else [ "$1" = iptables ]; fi
}

apply_iptables() {
    iptables_family iptables 127.0.0.0/8
    if has_ipv6; then
        iptables_family ip6tables ::1/128
    fi
}

# --- nftables ----------------------------------------------------------

# "a b c" -> "a, b, c" for one family, or nothing.
nft_set() {
    want_v6="$1"
    shift
    out=""
    for dst in "$@"; do
        if is_v6 "$dst"; then v6=yes; else v6=no; fi
        [ "$v6" = "$want_v6" ] && out="${out:+$out, }$dst"
    done
    printf '%s' "$out"
}

apply_nft() {
    # shellcheck disable=SC2086
    excl4="$(nft_set no $EXCLUDE)"
    # shellcheck disable=SC2086
    excl6="$(nft_set yes $EXCLUDE)"
    # shellcheck disable=SC2086
    res4="$(nft_set no $RESOLVERS)"
    # shellcheck disable=SC2086
    res6="$(nft_set yes $RESOLVERS)"
    {
        # Declaring the table first makes the delete succeed on a first run.
        echo "table inet portcullis"
        echo "delete table inet portcullis"
        echo "table inet portcullis {"
        echo "  chain output_nat {"
        echo "    type nat hook output priority -100; policy accept;"
        echo "    meta l4proto != tcp return"
        echo "    meta skuid $PROXY_UID return"
        echo "    ip daddr 127.0.0.0/8 return"
        echo "    ip6 daddr ::1 return"
        [ -n "$excl4" ] && echo "    ip daddr { $excl4 } return"
        [ -n "$excl6" ] && echo "    ip6 daddr { $excl6 } return"
        [ -n "$res4" ] && echo "    ip daddr { $res4 } tcp dport 53 return"
        [ -n "$res6" ] && echo "    ip6 daddr { $res6 } tcp dport 53 return"
        echo "    meta l4proto tcp redirect to :$PORT"
        echo "  }"
        echo "  chain output_filter {"
        echo "    type filter hook output priority 0; policy accept;"
        # NAT applies per connection; an INVALID TCP packet (out of window,
        # say) would leave untranslated, to the original address.
        echo "    meta l4proto tcp ct state invalid drop"
        echo "    meta l4proto != udp accept"
        echo "    ip daddr 127.0.0.0/8 accept"
        echo "    ip6 daddr ::1 accept"
        [ -n "$res4" ] && echo "    ip daddr { $res4 } udp dport 53 accept"
        [ -n "$res6" ] && echo "    ip6 daddr { $res6 } udp dport 53 accept"
        echo "    drop"
        echo "  }"
        echo "}"
    } | nft -f -
}

# --- choose and apply ----------------------------------------------------

if [ "$BACKEND" = auto ]; then
    if command -v iptables >/dev/null 2>&1 && iptables -w -t nat -S OUTPUT >/dev/null 2>&1; then
        BACKEND=iptables
    elif command -v nft >/dev/null 2>&1; then
        BACKEND=nft
    else
        fail "neither a working iptables nor nft found"
    fi
fi

case "$BACKEND" in
    iptables)
        if has_ipv6; then
            command -v ip6tables >/dev/null 2>&1 || fail "IPv6 is enabled but ip6tables is missing"
        fi
        apply_iptables
        ;;
    nft) apply_nft ;;
    *) fail "PORTCULLIS_BACKEND must be iptables, nft or auto, not '$BACKEND'" ;;
esac

echo "redirect.sh: TCP egress -> :$PORT via $BACKEND (exempt uid $PROXY_UID; exclude: ${EXCLUDE:-none}; DNS resolvers: ${RESOLVERS:-none})"
