// Node side of the real-client matrix (tests/clients.rs): fetch through
// undici's EnvHttpProxyAgent, which reads HTTP_PROXY / HTTPS_PROXY (and
// tunnels even http:// URLs with CONNECT). The test CA comes from
// NODE_EXTRA_CA_CERTS.
//
// Input lines: id<TAB>METHOD<TAB>URL<TAB>BODY. Output lines:
// id<TAB>STATUS<TAB>TEXT, STATUS the HTTP status or `error`, TEXT the status
// text and body, or the error message with its causes, on one line.
import { createInterface } from "node:readline";
import { EnvHttpProxyAgent, fetch } from "undici";

const dispatcher = new EnvHttpProxyAgent();

function oneLine(text) {
  return String(text).split(/\s+/).join(" ").trim();
}

function describe(err) {
  const parts = [];
  for (let e = err; e; e = e.cause) {
    parts.push(`${e.name}: ${e.message}`);
  }
  return parts.join(" <- ");
}

async function run(method, url, body) {
  try {
    const resp = await fetch(url, { method, body: body || undefined, dispatcher, signal: AbortSignal.timeout(10000) });
    return [String(resp.status), `${resp.statusText} | ${await resp.text()}`];
  } catch (err) {
    return ["error", describe(err)];
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const [id, method, url, body = ""] = line.split("\t");
  const [status, text] = await run(method, url, body);
  process.stdout.write(`${id}\t${status}\t${oneLine(text)}\n`);
}
await dispatcher.close();
