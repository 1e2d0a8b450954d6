// Test client for tests/transparent.rs: Node's built-in fetch (which ignores
// proxy variables anyway). `node client.mjs case=URL ...`; one JSON line per case.
for (const arg of process.argv.slice(2)) {
  const eq = arg.indexOf('=');
  const name = arg.slice(0, eq);
  const url = arg.slice(eq + 1);
  let out;
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(10000) });
    out = { status: r.status, deny: r.headers.get('x-portcullis-deny') ?? '', body: await r.text() };
  } catch (e) {
    out = { status: -1, error: String(e.cause ?? e) };
  }
  console.log(JSON.stringify({ case: name, ...out }));
}
