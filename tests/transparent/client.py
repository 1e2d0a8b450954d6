"""Test client for tests/transparent.rs: Python's standard library with no
proxy configured. Each argument is `case=SPEC`; one JSON line per case.

SPEC is an http(s) URL (urllib), or
  tcp://HOST:PORT          raw TCP: send "ping\\n", report what comes back
  tls://HOST:PORT/NAME     TLS with SNI NAME to HOST, then GET / with Host NAME
  keepalive://HOST:PORT/N1,N2,...  one HTTP/1.1 connection, one GET per
                           Host name in turn; status 0, body the statuses
                           joined by commas
  udp://HOST:PORT          send one datagram (nothing to report but errors)
  dns://HOST:PORT/NAME     one DNS A query over UDP; status 1 when answered
"""
import json
import socket
import ssl
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request

TIMEOUT = 10
CTX = ssl._create_unverified_context()  # the origin's certificate is a test one


def http(url):
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=CTX) as r:
            return {"status": r.status, "deny": r.headers.get("x-portcullis-deny", ""), "body": r.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "deny": e.headers.get("x-portcullis-deny", ""), "body": e.read().decode()}


def host_port(netloc):
    u = urllib.parse.urlsplit("x://" + netloc)
    return u.hostname, u.port


def tcp(netloc):
    with socket.create_connection(host_port(netloc), timeout=TIMEOUT) as s:
        s.sendall(b"ping\n")
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
            if got.endswith(b"\n"):
                break
    return {"status": 0, "body": got.decode(errors="replace")}


def tls(rest):
    netloc, name = rest.split("/", 1)
    with socket.create_connection(host_port(netloc), timeout=TIMEOUT) as raw:
        with CTX.wrap_socket(raw, server_hostname=name) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return {"status": int(head.split(b" ")[1]), "body": body.decode(errors="replace")}


def keepalive(rest):
    netloc, names = rest.split("/", 1)
    statuses = []
    with socket.create_connection(host_port(netloc), timeout=TIMEOUT) as s:
        reader = s.makefile("rb")
        for name in names.split(","):
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
            status = int(reader.readline().split(b" ")[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode().partition(":")
                if key.strip().lower() == "content-length":
                    length = int(value)
            reader.read(length)
            statuses.append(str(status))
    return {"status": 0, "body": ",".join(statuses)}


def udp(netloc):
    host, port = host_port(netloc)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(b"ping\n", (host, port))
    return {"status": 0}


def dns(rest):
    netloc, name = rest.split("/", 1)
    query = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\x00" + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(query, host_port(netloc))
        answer, _ = s.recvfrom(4096)
    return {"status": 1 if answer[:2] == b"\x12\x34" else 0}


def run(spec):
    scheme, _, rest = spec.partition("://")
    if scheme in ("http", "https"):
        return http(spec)
    return {"tcp": tcp, "tls": tls, "keepalive": keepalive, "udp": udp, "dns": dns}[scheme](rest)


for arg in sys.argv[1:]:
    case, spec = arg.split("=", 1)
    try:
        out = run(spec)
    except Exception as e:  # every failure is a result the test checks
        out = {"status": -1, "error": repr(e)}
    out["case"] = case
    print(json.dumps(out), flush=True)
