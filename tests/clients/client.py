"""Python side of the real-client matrix (tests/clients.rs).

Usage: python3 client.py urllib|requests < cases
Each input line is `id<TAB>METHOD<TAB>URL<TAB>BODY`; each output line is
`id<TAB>STATUS<TAB>TEXT`, STATUS the HTTP status or `error`, TEXT what a user
of the library sees (the exception message, or the reason phrase and body),
on one line. The proxy comes from the environment (HTTP(S)_PROXY) and the
test CA from CLIENT_CA.
"""
import os
import ssl
import sys
import urllib.error
import urllib.request


def one_line(text):
    return " ".join(str(text).split())


def with_urllib(method, url, body):
    context = ssl.create_default_context(cafile=os.environ["CLIENT_CA"])
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler(), urllib.request.HTTPSHandler(context=context)
    )
    data = body.encode() if body else None
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with opener.open(req, timeout=10) as resp:
            return str(resp.status), resp.reason + " | " + resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return str(e.code), str(e) + " | " + e.read().decode(errors="replace")
    except Exception as e:  # what the user's traceback would end with
        return "error", f"{type(e).__name__}: {e}"


def with_requests(method, url, body):
    import requests

    try:
        resp = requests.request(method, url, data=body.encode() or None, verify=os.environ["CLIENT_CA"], timeout=10)
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"
    try:
        resp.raise_for_status()
        return str(resp.status_code), resp.reason + " | " + resp.text
    except requests.HTTPError as e:
        return str(resp.status_code), f"{e} | {resp.text}"


def main():
    run = {"urllib": with_urllib, "requests": with_requests}[sys.argv[1]]
    for line in sys.stdin:
        if not line.strip():
            continue
        case, method, url, body = (line.rstrip("\n").split("\t") + [""])[:4]
        status, text = run(method, url, body)
        print(f"{case}\t{status}\t{one_line(text)}", flush=True)


if __name__ == "__main__":
    main()
