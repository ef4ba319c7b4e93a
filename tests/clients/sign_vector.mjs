// Signs requests with web/plait-sign.js and prints them as one JSON line, for
// server/tests/signature_js.rs to verify with the server's Rust code.
//
//   node sign_vector.mjs <seed hex, 64 digits> <created unix s> <nonce> [<request>]
//
// Without <request> it signs its own PUT and GET (nonces <nonce> and <nonce>-get) and
// prints them; with <request>, JSON `{"method", "url", "body"}`, it signs that one and
// prints `{"headers": ...}`, for comparison with what Rust signed from the same inputs.
import { register } from 'node:module';

register('./noble_resolve.mjs', import.meta.url);
const { signRequest, keyFromSeed, identityOf } = await import('../../web/plait-sign.js');

const [seedHex, created, nonce, request] = process.argv.slice(2);
if (!/^[0-9a-f]{64}$/.test(seedHex ?? '')) {
  throw new Error('usage: sign_vector.mjs SEED_HEX CREATED NONCE [REQUEST_JSON]');
}
const seed = Uint8Array.from(seedHex.match(/../g), (h) => parseInt(h, 16));
const key = keyFromSeed(seed);
const options = { created: Number(created), ttl: 60 };

if (request !== undefined) {
  const r = JSON.parse(request);
  const headers = await signRequest(r.method, r.url, null, r.body, key, { ...options, nonce });
  console.log(JSON.stringify({ headers }));
  process.exit(0);
}

// A PUT with a non-ASCII body to a URL that needs percent-encoding, and a GET without body.
const put = {
  method: 'put',
  url: 'http://127.0.0.1:8123/~' + key.identity + '/notes/caf\u00e9 list?draft=1&x=a b#top',
  body: 'h\u00e9llo \u2713 {"n": 1}\n',
};
const get = { method: 'GET', url: 'http://127.0.0.1:8123/~' + key.identity + '/notes' };

const requests = [];
for (const [r, n] of [[put, nonce], [get, nonce + '-get']]) {
  const headers = await signRequest(r.method, r.url, { 'content-type': 'text/plain' }, r.body, key, {
    ...options,
    nonce: n,
  });
  const u = new URL(r.url);
  requests.push({ method: r.method.toUpperCase(), host: u.host, path: u.pathname + u.search, body: r.body ?? null, headers });
}
console.log(JSON.stringify({ identity: key.identity, identityOfPublicKey: identityOf(key.publicKey), requests }));
