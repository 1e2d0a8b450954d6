#!/bin/sh
# Lists (addresses, interfaces, rules) are split on spaces on purpose;
# globbing is off (set -f), so an unquoted list cannot expand to file names.
# shellcheck disable=SC2086,SC2046
# Sends workload TCP to Portcullis's transparent listener and drops what
# Portcullis cannot decide. Two modes:
#
#   sidecar (default)  rules in the workload's own network namespace (a pod,
#       a compose service's namespace), in OUTPUT. Portcullis runs in that
#       namespace as PORTCULLIS_UID, which is exempt. Whoever controls the
#       workload's namespace or uid can undo this (docs/ENFORCEMENT.md).
#   router  rules in the namespace that *routes* the workloads' traffic (a
#       Kubernetes node, a Docker daemon's namespace, a VM host), in
#       PREROUTING, FORWARD and INPUT, for packets arriving on the
#       PORTCULLIS_FROM interfaces. Nothing in the workload is exempt: no uid,
#       no mark. Portcullis's own connections leave through OUTPUT, which these
#       rules never touch.
#
# Run as root or with CAP_NET_ADMIN (+ CAP_NET_RAW for iptables). Running it
# again replaces what it installed. Used unmodified by the Kubernetes init
# containers (deploy/kubernetes/transparent-sidecar/, deploy/kubernetes/node/),
# the compose variant and tests/transparent.rs, tests/router.rs.
#
# Usage: redirect.sh            install (or replace) the rules
#        redirect.sh --check    print what is installed; exit 1 if missing
#        redirect.sh --remove   remove exactly what this script installs
#
# Settings (environment):
#   PORTCULLIS_MODE              sidecar | router (default sidecar)
#   PORTCULLIS_TRANSPARENT_PORT  port of `transparent_listen` (default 15001)
#   PORTCULLIS_UID               sidecar: uid Portcullis runs as; its own
#                                connections are not redirected (default
#                                62211, see below). Refused in router mode.
#   PORTCULLIS_MARK              sidecar: exempt Portcullis by packet mark
#                                instead of uid: the `upstream.mark` it sets on
#                                its upstream sockets (decimal or 0x hex; needs
#                                CAP_NET_ADMIN in Portcullis's container).
#                                Workloads must then hold neither NET_ADMIN nor
#                                NET_RAW (either sets a mark). Not with
#                                PORTCULLIS_UID or PORTCULLIS_DNS_PORT (its DNS
#                                queries carry no mark). Refused in router mode.
#   PORTCULLIS_FROM              router: interfaces the workloads' traffic
#                                arrives on, names or `+` wildcards
#                                (e.g. "veth+ cali+ docker0"). Required.
#   PORTCULLIS_ROUTER_ADDRS      router: this router's own addresses (one IPv4,
#                                one IPv6) to DNAT redirected connections to.
#                                Needed where the workload interfaces carry
#                                no address of their own (Calico's cali*, AWS
#                                VPC CNI, IPv6 with only link-local): REDIRECT
#                                uses the ingress interface's address and drops
#                                the packet when there is none. Default: REDIRECT.
#   PORTCULLIS_EXCLUDE           destinations left alone: addresses or CIDRs,
#                                IPv4 or IPv6, separated by spaces or commas.
#                                Sidecar: TCP only. Router: every protocol
#                                (pod and Service CIDRs that NetworkPolicy
#                                governs). Default none.
#   PORTCULLIS_DNS_PORT          port of Portcullis's DNS listener: UDP and TCP
#                                to port 53, any destination (exclusions
#                                included), go there. Default unset.
#   PORTCULLIS_DNS_RESOLVERS     without PORTCULLIS_DNS_PORT: resolvers that may
#                                be asked directly over UDP and TCP port 53.
#                                Default none: no DNS.
#   PORTCULLIS_BACKEND           iptables | nft | auto (default auto:
#                                iptables when it works here, else nft)
#
# The default exempt uid, 62211, is one no image is built with: above the
# range useradd hands out (UID_MAX 60000) and below the reserved 65532-65535.
# 65532, the old default, is distroless's and Chainguard's `nonroot`, so a
# worker built on those images was exempt without asking.
#
# Sidecar mode: what stays direct is the exempt uid, loopback, the exclusions
# and DNS to the resolvers. UDP is dropped (QUIC clients fall back to TCP);
# other IP protocols are not touched there, which is one of the reasons
# router mode exists.
# Router mode: from PORTCULLIS_FROM, TCP (to anywhere, the router's own
# addresses included) goes to Portcullis; DNS as above; excluded
# destinations pass; replies on connections the workload did not start
# pass (kubelet probes, Service traffic into the pod), and so do ICMP errors
# about its connections (PMTU) and IPv6 neighbour discovery with the router.
# Every other packet (UDP, UDP-Lite, SCTP, GRE, ICMP, raw IP) is dropped,
# forwarded or addressed to the router. When Portcullis is down, redirected
# connections are refused: nothing is forwarded around it.
set -euf

ACTION=apply
case "${1:-}" in
    '') ;;
    --check) ACTION=check ;;
    --remove) ACTION=remove ;;
    *) echo "usage: redirect.sh [--check | --remove]" >&2; exit 2 ;;
esac

MODE="${PORTCULLIS_MODE:-sidecar}"
PORT="${PORTCULLIS_TRANSPARENT_PORT:-15001}"
DNS_PORT="${PORTCULLIS_DNS_PORT:-}"
EXCLUDE="$(printf '%s' "${PORTCULLIS_EXCLUDE:-}" | tr ',' ' ')"
RESOLVERS="$(printf '%s' "${PORTCULLIS_DNS_RESOLVERS:-}" | tr ',' ' ')"
FROM="$(printf '%s' "${PORTCULLIS_FROM:-}" | tr ',' ' ')"
ROUTER_ADDRS="$(printf '%s' "${PORTCULLIS_ROUTER_ADDRS:-}" | tr ',' ' ')"
BACKEND="${PORTCULLIS_BACKEND:-auto}"

# IPv6 TCP that REDIRECT in PREROUTING cannot translate: nf_nat_redirect_ipv6
# picks an address of the ingress interface with the destination's scope
# and drops the packet when there is none, so the client hangs. Measured on
# Linux 6.18 (tests/router.rs checks it): IPv4-compatible ::/96 and
# site-local fec0::/10. Link-local is on-link and never routed here; mapped,
# NAT64 and 6to4 destinations translate. Router mode rejects these with a
# TCP reset unless it DNATs to PORTCULLIS_ROUTER_ADDRS, which has no scope rule.
# Sidecar mode (REDIRECT in OUTPUT, to ::1) translates those. TCP to a
# link-local address is bound to its interface and cannot be rerouted to ::1,
# so it times out there: fail closed. A REJECT does not help, its reset is
# routed without the interface and never arrives (measured).
UNTRANSLATABLE6="::/96 fec0::/10"

fail() {
    echo "redirect.sh: $*" >&2
    exit 1
}

case "$PORT" in '' | *[!0-9]*) fail "PORTCULLIS_TRANSPARENT_PORT must be a port number, not '$PORT'" ;; esac
case "$DNS_PORT" in *[!0-9]*) fail "PORTCULLIS_DNS_PORT must be a port number, not '$DNS_PORT'" ;; esac
case "$MODE" in
    sidecar)
        PROXY_UID="${PORTCULLIS_UID:-62211}"
        case "$PROXY_UID" in '' | *[!0-9]*) fail "PORTCULLIS_UID must be a numeric uid, not '$PROXY_UID'" ;; esac
        EXEMPT_IPT="-m owner --uid-owner $PROXY_UID" EXEMPT_NFT="meta skuid $PROXY_UID" EXEMPT="uid $PROXY_UID"
        if [ -n "${PORTCULLIS_MARK:-}" ]; then
            case "$PORTCULLIS_MARK" in 0x*[!0-9a-fA-F]* | 0x | [!0-9]* | [1-9]*[!0-9]* | 0[!x]*) fail "PORTCULLIS_MARK must be a number (decimal or 0x hex), not '$PORTCULLIS_MARK'" ;; esac
            [ -z "${PORTCULLIS_UID:-}" ] || fail "PORTCULLIS_MARK and PORTCULLIS_UID: exempt by one, not both"
            [ -z "$DNS_PORT" ] || fail "PORTCULLIS_MARK with PORTCULLIS_DNS_PORT: Portcullis's own DNS queries carry no mark; use PORTCULLIS_DNS_RESOLVERS"
            EXEMPT_IPT="-m mark --mark $PORTCULLIS_MARK" EXEMPT_NFT="meta mark $PORTCULLIS_MARK" EXEMPT="mark $PORTCULLIS_MARK"
        fi
        [ -z "$FROM" ] || fail "PORTCULLIS_FROM is for router mode (PORTCULLIS_MODE=router)"
        [ -z "$ROUTER_ADDRS" ] || fail "PORTCULLIS_ROUTER_ADDRS is for router mode (PORTCULLIS_MODE=router)"
        ;;
    router)
        # Nothing in the workload may be exempt; a uid here means a sidecar
        # recipe was pointed at a router by mistake.
        [ -z "${PORTCULLIS_UID:-}" ] || fail "router mode has no exempt uid; unset PORTCULLIS_UID"
        [ -z "${PORTCULLIS_MARK:-}" ] || fail "router mode has no exempt mark; unset PORTCULLIS_MARK"
        if [ "$ACTION" = apply ]; then
            [ -n "$FROM" ] || fail "router mode needs PORTCULLIS_FROM, the workload interfaces (e.g. 'veth+ cali+')"
        fi
        for iface in $FROM; do
            case "$iface" in *[!A-Za-z0-9_.@+-]* | +*) fail "PORTCULLIS_FROM: '$iface' is not an interface name or prefix+" ;; esac
        done
        ;;
    *) fail "PORTCULLIS_MODE must be sidecar or router, not '$MODE'" ;;
esac

# IPv6 rules are required whenever the namespace has IPv6 at all: a
# namespace where only IPv4 is redirected leaks every IPv6 connection.
has_ipv6() {
    [ -e /proc/net/if_inet6 ]
}

is_v6() {
    case "$1" in *:*) return 0 ;; *) return 1 ;; esac
}

# The addresses among $2... of family $1 (4 or 6), space-separated.
of_family() {
    want="$1"
    shift
    out=""
    for a in "$@"; do
        if is_v6 "$a"; then f=6; else f=4; fi
        [ "$f" = "$want" ] && out="${out:+$out }$a"
    done
    printf '%s' "$out"
}

ROUTER4="$(of_family 4 $ROUTER_ADDRS)"
ROUTER6="$(of_family 6 $ROUTER_ADDRS)"
case "$ROUTER4" in *' '*) fail "PORTCULLIS_ROUTER_ADDRS: one IPv4 address, not '$ROUTER4'" ;; esac
case "$ROUTER6" in *' '*) fail "PORTCULLIS_ROUTER_ADDRS: one IPv6 address, not '$ROUTER6'" ;; esac

# --- sidecar: iptables / ip6tables -------------------------------------

# $1: iptables or ip6tables; $2: the loopback range of that family.
sidecar_iptables_family() {
    ipt="$1"
    loopback="$2"
    if [ "$ipt" = iptables ]; then fam=4; else fam=6; fi
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

    $ipt -w -t nat -A PORTCULLIS_OUTPUT $EXEMPT_IPT -j RETURN
    $ipt -w -t nat -A PORTCULLIS_OUTPUT -d "$loopback" -j RETURN
    $ipt -w -t filter -A PORTCULLIS_UDP -d "$loopback" -j RETURN
    if [ -n "$DNS_PORT" ]; then
        $ipt -w -t nat -A PORTCULLIS_OUTPUT -p tcp --dport 53 -j REDIRECT --to-ports "$DNS_PORT"
        $ipt -w -t nat -N PORTCULLIS_DNS 2>/dev/null || $ipt -w -t nat -F PORTCULLIS_DNS
        $ipt -w -t nat -C OUTPUT -p udp -j PORTCULLIS_DNS 2>/dev/null ||
            $ipt -w -t nat -A OUTPUT -p udp -j PORTCULLIS_DNS
        $ipt -w -t nat -A PORTCULLIS_DNS $EXEMPT_IPT -j RETURN
        $ipt -w -t nat -A PORTCULLIS_DNS -p udp --dport 53 -j REDIRECT --to-ports "$DNS_PORT"
        $ipt -w -t filter -A PORTCULLIS_UDP $EXEMPT_IPT -p udp --dport 53 -j RETURN
    fi
    for dst in $(of_family "$fam" $EXCLUDE); do
        $ipt -w -t nat -A PORTCULLIS_OUTPUT -d "$dst" -j RETURN
    done
    for dst in $(of_family "$fam" $RESOLVERS); do
        $ipt -w -t nat -A PORTCULLIS_OUTPUT -d "$dst" -p tcp --dport 53 -j RETURN
        $ipt -w -t filter -A PORTCULLIS_UDP -d "$dst" -p udp --dport 53 -j RETURN
    done
    $ipt -w -t nat -A PORTCULLIS_OUTPUT -p tcp -j REDIRECT --to-ports "$PORT"
    $ipt -w -t filter -A PORTCULLIS_UDP -j DROP
}

# The rules in the built-in chains that jump to ours or that we appended.
sidecar_iptables_own() {
    ipt="$1"
    $ipt -w -t nat -S OUTPUT 2>/dev/null | grep -E -- '-j PORTCULLIS_(OUTPUT|DNS)$' | sed 's/^/nat /' || true
    $ipt -w -t filter -S OUTPUT 2>/dev/null |
        grep -E -- '-j PORTCULLIS_UDP$|--ctstate INVALID -j DROP$' | sed 's/^/filter /' || true
}

sidecar_iptables_remove() {
    ipt="$1"
    sidecar_iptables_own "$ipt" | while read -r table rule; do
            $ipt -w -t "$table" $(printf '%s' "$rule" | sed 's/^-A /-D /')
    done
    for tc in nat:PORTCULLIS_OUTPUT nat:PORTCULLIS_DNS filter:PORTCULLIS_UDP; do
        $ipt -w -t "${tc%%:*}" -F "${tc#*:}" 2>/dev/null && $ipt -w -t "${tc%%:*}" -X "${tc#*:}"
    done
    return 0
}

sidecar_iptables_check() {
    ipt="$1"
    own="$(sidecar_iptables_own "$ipt")"
    printf '%s\n' "$own" | grep -q -- '-j PORTCULLIS_OUTPUT$' || return 1
    printf '%s\n' "$own" | grep -q -- '-j PORTCULLIS_UDP$' || return 1
    echo "# $ipt (sidecar)"
    printf '%s\n' "$own"
    $ipt -w -t nat -S PORTCULLIS_OUTPUT
    $ipt -w -t nat -S PORTCULLIS_DNS 2>/dev/null || true
    $ipt -w -t filter -S PORTCULLIS_UDP
}

# --- sidecar: nftables ---------------------------------------------------

# "a b c" -> "a, b, c" for family $1 (4 or 6), or nothing.
nft_set() {
    fam="$1"
    shift
    of_family "$fam" "$@" | sed 's/ /, /g'
}

sidecar_nft() {
    excl4="$(nft_set 4 $EXCLUDE)"
    excl6="$(nft_set 6 $EXCLUDE)"
    res4="$(nft_set 4 $RESOLVERS)"
    res6="$(nft_set 6 $RESOLVERS)"
    {
        # Declaring the table first makes the delete succeed on a first run;
        # the whole file is one transaction, so there is no moment without rules.
        echo "table inet portcullis"
        echo "delete table inet portcullis"
        echo "table inet portcullis {"
        echo "  chain output_nat {"
        echo "    type nat hook output priority -100; policy accept;"
        echo "    $EXEMPT_NFT return"
        echo "    ip daddr 127.0.0.0/8 return"
        echo "    ip6 daddr ::1 return"
        if [ -n "$DNS_PORT" ]; then
            echo "    meta l4proto udp udp dport 53 redirect to :$DNS_PORT"
        fi
        echo "    meta l4proto != tcp return"
        [ -n "$DNS_PORT" ] && echo "    tcp dport 53 redirect to :$DNS_PORT"
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
        [ -n "$DNS_PORT" ] && echo "    $EXEMPT_NFT udp dport 53 accept"
        [ -n "$res4" ] && echo "    ip daddr { $res4 } udp dport 53 accept"
        [ -n "$res6" ] && echo "    ip6 daddr { $res6 } udp dport 53 accept"
        echo "    drop"
        echo "  }"
        echo "}"
    } | nft -f -
}

# --- router: iptables / ip6tables ----------------------------------------

# The iptables-restore text for family $1 (4 or 6): our chains, declared
# (which empties them) and filled in one commit per table, so a re-run
# never leaves a moment without rules.
router_iptables_text() {
    fam="$1"
    if [ "$fam" = 4 ]; then icmp=icmp; router="$ROUTER4"; else icmp=ipv6-icmp; router="$ROUTER6"; fi
    if [ -n "$router" ]; then
        [ "$fam" = 6 ] && router="[$router]"
        to_port() { echo "-j DNAT --to-destination $router:$1"; }
    else
        to_port() { echo "-j REDIRECT --to-ports $1"; }
    fi
    echo "*nat"
    echo ":PORTCULLIS_PRE - [0:0]"
    if [ -n "$DNS_PORT" ]; then
        echo "-A PORTCULLIS_PRE -p udp --dport 53 $(to_port "$DNS_PORT")"
        echo "-A PORTCULLIS_PRE -p tcp --dport 53 $(to_port "$DNS_PORT")"
    fi
    for dst in $(of_family "$fam" $EXCLUDE); do
        echo "-A PORTCULLIS_PRE -d $dst -j RETURN"
    done
    if [ -z "$DNS_PORT" ]; then
        for dst in $(of_family "$fam" $RESOLVERS); do
            echo "-A PORTCULLIS_PRE -d $dst -p tcp --dport 53 -j RETURN"
        done
    fi
    if [ "$fam" = 6 ] && [ -z "$router" ]; then
        for dst in $UNTRANSLATABLE6; do echo "-A PORTCULLIS_PRE -d $dst -j RETURN"; done
    fi
    echo "-A PORTCULLIS_PRE -p tcp $(to_port "$PORT")"
    echo "COMMIT"
    echo "*filter"
    for chain in PORTCULLIS_FWD PORTCULLIS_IN; do
        echo ":$chain - [0:0]"
    done
    for chain in PORTCULLIS_FWD PORTCULLIS_IN; do
        echo "-A $chain -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT"
        echo "-A $chain -p $icmp -m conntrack --ctstate RELATED -j ACCEPT"
        for dst in $(of_family "$fam" $EXCLUDE); do
            echo "-A $chain -d $dst -j ACCEPT"
        done
        if [ -z "$DNS_PORT" ]; then
            for dst in $(of_family "$fam" $RESOLVERS); do
                echo "-A $chain -d $dst -p udp --dport 53 -j ACCEPT"
                echo "-A $chain -d $dst -p tcp --dport 53 -j ACCEPT"
            done
        fi
        if [ "$fam" = 6 ] && [ -z "$router" ]; then
            for dst in $UNTRANSLATABLE6; do
                echo "-A $chain -d $dst -p tcp -j REJECT --reject-with tcp-reset"
            done
        fi
    done
    # Redirected connections arrive here, addressed to the listener's port.
    echo "-A PORTCULLIS_IN -p tcp --dport $PORT -j ACCEPT"
    if [ -n "$DNS_PORT" ]; then
        echo "-A PORTCULLIS_IN -p udp --dport $DNS_PORT -j ACCEPT"
        echo "-A PORTCULLIS_IN -p tcp --dport $DNS_PORT -j ACCEPT"
    fi
    if [ "$fam" = 6 ]; then
        # Without neighbour discovery with the router, IPv6 does not work at all.
        for type in router-solicitation neighbour-solicitation neighbour-advertisement; do
            echo "-A PORTCULLIS_IN -p ipv6-icmp --icmpv6-type $type -m hl --hl-eq 255 -j ACCEPT"
        done
    fi
    for chain in PORTCULLIS_FWD PORTCULLIS_IN; do
        echo "-A $chain -j DROP"
    done
    echo "COMMIT"
}

# "table builtin-chain our-chain" for every jump router mode installs.
ROUTER_JUMPS="nat PREROUTING PORTCULLIS_PRE
filter FORWARD PORTCULLIS_FWD
filter INPUT PORTCULLIS_IN"

# The jump rules to our chains now in the built-in chains: "table rule".
router_iptables_own() {
    ipt="$1"
    printf '%s\n' "$ROUTER_JUMPS" | while read -r table builtin ours; do
        $ipt -w -t "$table" -S "$builtin" 2>/dev/null | grep -- "-j $ours\$" | sed "s/^/$table /" || true
    done
}

router_iptables_apply() {
    ipt="$1"
    fam="$2"
    router_iptables_text "$fam" | "$ipt-restore" -w --noflush
    # Jumps go first in their chains: an ACCEPT placed before them by another
    # agent would let workload packets past the drop.
    printf '%s\n' "$ROUTER_JUMPS" | while read -r table builtin ours; do
        for iface in $FROM; do
            $ipt -w -t "$table" -C "$builtin" -i "$iface" -j "$ours" 2>/dev/null ||
                $ipt -w -t "$table" -I "$builtin" 1 -i "$iface" -j "$ours"
        done
    done
    # Jumps for interfaces no longer in PORTCULLIS_FROM.
    router_iptables_own "$ipt" | while read -r table rule; do
        iface="$(printf '%s' "$rule" | sed -n 's/.* -i \([^ ]*\) .*/\1/p')"
        case " $FROM " in *" $iface "*) continue ;; esac
            $ipt -w -t "$table" $(printf '%s' "$rule" | sed 's/^-A /-D /')
    done
}

router_iptables_remove() {
    ipt="$1"
    router_iptables_own "$ipt" | while read -r table rule; do
            $ipt -w -t "$table" $(printf '%s' "$rule" | sed 's/^-A /-D /')
    done
    for tc in nat:PORTCULLIS_PRE filter:PORTCULLIS_FWD filter:PORTCULLIS_IN; do
        $ipt -w -t "${tc%%:*}" -F "${tc#*:}" 2>/dev/null && $ipt -w -t "${tc%%:*}" -X "${tc#*:}"
    done
    return 0
}

router_iptables_check() {
    ipt="$1"
    own="$(router_iptables_own "$ipt")"
    for ours in PORTCULLIS_PRE PORTCULLIS_FWD PORTCULLIS_IN; do
        printf '%s\n' "$own" | grep -q -- "-j $ours\$" || return 1
    done
    echo "# $ipt (router)"
    printf '%s\n' "$own"
    $ipt -w -t nat -S PORTCULLIS_PRE
    $ipt -w -t filter -S PORTCULLIS_FWD
    $ipt -w -t filter -S PORTCULLIS_IN
}

# --- router: nftables ----------------------------------------------------

# One `iifname` match per interface; nft spells the wildcard `*`.
nft_ifaces() {
    for iface in $FROM; do
        case "$iface" in *+) iface="${iface%+}*" ;; esac
        echo "    iifname \"$iface\" $1"
    done
}

router_nft() {
    excl4="$(nft_set 4 $EXCLUDE)"
    excl6="$(nft_set 6 $EXCLUDE)"
    res4=""
    res6=""
    if [ -z "$DNS_PORT" ]; then
            res4="$(nft_set 4 $RESOLVERS)"
            res6="$(nft_set 6 $RESOLVERS)"
    fi
    untranslatable="$(printf '%s' "$UNTRANSLATABLE6" | sed 's/ /, /g')"
    # `redirect` uses the ingress interface's address; `dnat` a fixed one.
    to4() { if [ -n "$ROUTER4" ]; then echo "dnat ip to $ROUTER4:$1"; else echo "redirect to :$1"; fi; }
    to6() { if [ -n "$ROUTER6" ]; then echo "dnat ip6 to [$ROUTER6]:$1"; else echo "redirect to :$1"; fi; }
    {
        echo "table inet portcullis_router"
        echo "delete table inet portcullis_router"
        echo "table inet portcullis_router {"
        # Before kube-proxy's and Docker's DNAT (priority -100): the first NAT
        # mapping of a connection is the one that holds.
        echo "  chain prerouting {"
        echo "    type nat hook prerouting priority -110; policy accept;"
        nft_ifaces "jump workload_nat"
        echo "  }"
        echo "  chain workload_nat {"
        if [ -n "$DNS_PORT" ]; then
            echo "    meta nfproto ipv4 meta l4proto { tcp, udp } th dport 53 $(to4 "$DNS_PORT")"
            echo "    meta nfproto ipv6 meta l4proto { tcp, udp } th dport 53 $(to6 "$DNS_PORT")"
        fi
        [ -n "$excl4" ] && echo "    ip daddr { $excl4 } return"
        [ -n "$excl6" ] && echo "    ip6 daddr { $excl6 } return"
        [ -n "$res4" ] && echo "    ip daddr { $res4 } tcp dport 53 return"
        [ -n "$res6" ] && echo "    ip6 daddr { $res6 } tcp dport 53 return"
        [ -z "$ROUTER6" ] && echo "    ip6 daddr { $untranslatable } return"
        echo "    meta nfproto ipv4 meta l4proto tcp $(to4 "$PORT")"
        echo "    meta nfproto ipv6 meta l4proto tcp $(to6 "$PORT")"
        echo "  }"
        # A drop here is final whatever other tables accept.
        echo "  chain forward {"
        echo "    type filter hook forward priority 0; policy accept;"
        nft_ifaces "jump workload_forward"
        echo "  }"
        echo "  chain input {"
        echo "    type filter hook input priority 0; policy accept;"
        nft_ifaces "jump workload_input"
        echo "  }"
        echo "  chain workload_common {"
        echo "    ct direction reply ct state established accept"
        echo "    ct state related meta l4proto { icmp, ipv6-icmp } accept"
        [ -n "$excl4" ] && echo "    ip daddr { $excl4 } accept"
        [ -n "$excl6" ] && echo "    ip6 daddr { $excl6 } accept"
        [ -n "$res4" ] && echo "    ip daddr { $res4 } meta l4proto { tcp, udp } th dport 53 accept"
        [ -n "$res6" ] && echo "    ip6 daddr { $res6 } meta l4proto { tcp, udp } th dport 53 accept"
        [ -z "$ROUTER6" ] && echo "    ip6 daddr { $untranslatable } meta l4proto tcp reject with tcp reset"
        echo "  }"
        echo "  chain workload_forward {"
        echo "    jump workload_common"
        echo "    drop"
        echo "  }"
        echo "  chain workload_input {"
        echo "    jump workload_common"
        echo "    tcp dport $PORT accept"
        [ -n "$DNS_PORT" ] && echo "    meta l4proto { tcp, udp } th dport $DNS_PORT accept"
        # Without neighbour discovery with the router, IPv6 does not work at all.
        echo "    icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept"
        echo "    drop"
        echo "  }"
        echo "}"
    } | nft -f -
}

# --- choose the backend and act ------------------------------------------

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
        ;;
    nft) command -v nft >/dev/null 2>&1 || fail "PORTCULLIS_BACKEND=nft but nft is missing" ;;
    *) fail "PORTCULLIS_BACKEND must be iptables, nft or auto, not '$BACKEND'" ;;
esac

if [ "$MODE" = sidecar ]; then NFT_TABLE=portcullis; else NFT_TABLE=portcullis_router; fi

# Runs "$1_iptables_$2 FAMILY-COMMAND [4|6]" for IPv4 and, when the namespace
# has it, IPv6; every call must succeed.
each_family() {
    "$1" iptables 4 || return 1
    if has_ipv6; then "$1" ip6tables 6 || return 1; fi
}

sidecar_iptables_apply() {
    if [ "$2" = 4 ]; then sidecar_iptables_family "$1" 127.0.0.0/8; else sidecar_iptables_family "$1" ::1/128; fi
}

case "$ACTION:$BACKEND" in
    apply:iptables) each_family "${MODE}_iptables_apply" ;;
    apply:nft) "${MODE}_nft" ;;
    check:iptables)
        each_family "${MODE}_iptables_check" || fail "$MODE rules are not installed (iptables)"
        exit 0
        ;;
    check:nft)
        nft list table inet "$NFT_TABLE" 2>/dev/null || fail "$MODE rules are not installed (nft table inet $NFT_TABLE)"
        exit 0
        ;;
    remove:iptables)
        each_family "${MODE}_iptables_remove"
        echo "redirect.sh: $MODE rules removed (iptables)"
        exit 0
        ;;
    remove:nft)
        { echo "table inet $NFT_TABLE"; echo "delete table inet $NFT_TABLE"; } | nft -f -
        echo "redirect.sh: $MODE rules removed (nft)"
        exit 0
        ;;
esac

if [ -n "$DNS_PORT" ]; then DNS="to :$DNS_PORT"; else DNS="resolvers ${RESOLVERS:-none}"; fi
if [ "$MODE" = sidecar ]; then
    echo "redirect.sh: sidecar: TCP egress -> :$PORT via $BACKEND (exempt $EXEMPT; exclude: ${EXCLUDE:-none}; DNS: $DNS)"
else
    echo "redirect.sh: router: TCP from $FROM -> ${ROUTER_ADDRS:-the ingress address}:$PORT via $BACKEND; all else dropped (exclude: ${EXCLUDE:-none}; DNS: $DNS)"
fi
