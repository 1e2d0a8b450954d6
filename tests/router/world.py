"""The world for tests/router.rs: every listener a workload might try to
reach, each writing one JSON line per contact to stdout.

    world.py world CERT KEY    origins, canaries and loggers (below)
    world.py dns PORT          a stand-in for Portcullis's DNS listener on the
                               node: logs and answers nothing
    world.py canary PORT       a TCP canary on [::]:PORT (the node's kubelet)
    world.py echo PORT         answers "pong" on [::]:PORT (ingress to a pod)

World listeners:
  origin 11.0.0.10 and 2600::10, HTTP :80 and HTTPS :443 (allowed.test):
      answers "origin local=ADDR host=HOST", logs {"event": "origin", ...}
  TCP canaries: 169.254.169.254 :80 :443, 11.0.0.50 and 2600::50 :22 :7000 :8080
  UDP canaries: 169.254.169.254 :80 :53, 11.0.0.50 and 2600::50 :9999
  UDP-Lite 11.0.0.50 and 2600::50 :9998
  a resolver on 11.0.0.53 (UDP and TCP 53) logging every query
  raw loggers: ICMP and ICMPv6 echo requests that carry a payload, IP
      protocol 132 (SCTP: the kernel may have no SCTP, so raw) and 253
Every line but "ready" and "origin" is a canary: the test requires none.
"""
import json
import socket
import ssl
import sys
import threading

IPPROTO_UDPLITE = 136
ORIGINS = ["11.0.0.10", "2600::10"]
MISC = ["11.0.0.50", "2600::50"]
METADATA = "169.254.169.254"
RESOLVER = "11.0.0.53"

lock = threading.Lock()


def log(**event):
    with lock:
        print(json.dumps(event), flush=True)


def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def listen_tcp(addr, port):
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(64)
    return s


def serve(target, *args):
    threading.Thread(target=target, args=args, daemon=True).start()


def origin(listener, addr, port, tls):
    while True:
        conn, peer = listener.accept()
        serve(origin_conn, conn, peer, addr, port, tls)


def origin_conn(conn, peer, addr, port, tls):
    try:
        conn.settimeout(10)
        if tls:
            conn = tls.wrap_socket(conn, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        host = ""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"host":
                host = value.strip().decode()
        local = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
        log(event="origin", src=peer[0], local=local, host=host)
        body = f"origin local={local} host={host}\n".encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    except (OSError, ssl.SSLError):
        pass
    finally:
        conn.close()


def tcp_canary(listener, addr, port):
    while True:
        conn, peer = listener.accept()
        log(event="tcp", src=peer[0], dst=addr, port=port)
        conn.close()


def dgram_canary(addr, port, proto, name):
    s = socket.socket(family(addr), socket.SOCK_DGRAM, proto)
    s.bind((addr, port))
    while True:
        data, peer = s.recvfrom(65535)
        log(event=name, src=peer[0], dst=addr, port=port, bytes=len(data))


def dns_name(query):
    labels, i = [], 12
    while i < len(query) and query[i]:
        n = query[i]
        labels.append(query[i + 1:i + 1 + n].decode(errors="replace"))
        i += 1 + n
    return ".".join(labels)


def resolver_udp(addr):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        data, peer = s.recvfrom(65535)
        log(event="dns-query", transport="udp", src=peer[0], name=dns_name(data))


def resolver_tcp(listener):
    while True:
        conn, peer = listener.accept()
        conn.settimeout(5)
        try:
            data = conn.recv(65535)
            log(event="dns-query", transport="tcp", src=peer[0], name=dns_name(data[2:]))
        except OSError:
            log(event="dns-query", transport="tcp", src=peer[0], name="")
        conn.close()


def raw_logger(fam, proto, name):
    s = socket.socket(fam, socket.SOCK_RAW, proto)
    while True:
        data, peer = s.recvfrom(65535)
        if fam == socket.AF_INET:
            data = data[(data[0] & 0x0F) * 4:]  # IPv4 raw sockets see the IP header
        if proto in (socket.IPPROTO_ICMP, socket.IPPROTO_ICMPV6):
            echo_request = 8 if proto == socket.IPPROTO_ICMP else 128
            if not data or data[0] != echo_request or len(data) <= 8:
                continue  # not an echo request carrying a payload
        log(event=name, src=peer[0], bytes=len(data))


def world(cert, key):
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    for addr in ORIGINS:
        serve(origin, listen_tcp(addr, 80), addr, 80, None)
        serve(origin, listen_tcp(addr, 443), addr, 443, tls)
    for addr, ports in [(METADATA, [80, 443])] + [(a, [22, 7000, 8080]) for a in MISC]:
        for port in ports:
            serve(tcp_canary, listen_tcp(addr, port), addr, port)
    for addr, port in [(METADATA, 80), (METADATA, 53)] + [(a, 9999) for a in MISC]:
        serve(dgram_canary, addr, port, socket.IPPROTO_UDP, "udp")
    for addr in MISC:
        serve(dgram_canary, addr, 9998, IPPROTO_UDPLITE, "udplite")
    serve(resolver_udp, RESOLVER)
    serve(resolver_tcp, listen_tcp(RESOLVER, 53))
    for fam, proto, name in [
        (socket.AF_INET, socket.IPPROTO_ICMP, "icmp-echo"),
        (socket.AF_INET6, socket.IPPROTO_ICMPV6, "icmp6-echo"),
        (socket.AF_INET, 132, "sctp"),
        (socket.AF_INET6, 132, "sctp"),
        (socket.AF_INET, 253, "raw-ip"),
        (socket.AF_INET6, 253, "raw-ip"),
    ]:
        serve(raw_logger, fam, proto, name)
    log(event="ready")


def node_dns(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::", port))
    log(event="ready")
    while True:
        data, peer = s.recvfrom(65535)
        log(event="node-dns", src=peer[0], name=dns_name(data))


def echo(listener):
    while True:
        conn, peer = listener.accept()
        log(event="ingress", src=peer[0])
        conn.sendall(b"pong\n")
        conn.close()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "world":
        world(sys.argv[2], sys.argv[3])
    elif mode == "dns":
        node_dns(int(sys.argv[2]))
    else:
        port = int(sys.argv[2])
        listener = listen_tcp("::", port)
        serve(tcp_canary if mode == "canary" else echo, listener, *(["::", port] if mode == "canary" else []))
        log(event="ready")
    threading.Event().wait()
