// plait-sign.js: sign `fetch` and Braid requests to a Plait server with an ed25519 key, as
// HTTP Message Signatures (RFC 9421) with a Content-Digest (RFC 9530) of the body.
//
// The server's side is server/src/access/signature.rs; the two agree byte for byte (a test
// in server/tests/signature_js.rs checks it). A signed request carries:
//
//   Content-Digest: sha-256=:<base64>:                  (PUT, PATCH, POST, or any body)
//   Signature-Input: sig1=("@method" "@target-uri" "content-digest");created=<unix s>
//     ;expires=<unix s>;nonce="<random>";keyid="<identity>";alg="ed25519"
//   Signature: sig1=:<base64 ed25519 signature>:
//
// Each signature is good once (the server remembers its nonce) and for a short time (60 s
// by default, 300 s at most), so sign each request, and each retry, anew. A Braid
// subscription that reconnects must be given fresh headers for every connection.
//
// Dependencies: @noble/ed25519 (signatures) and @noble/hashes (SHA-256 and SHA-512, which
// also work on pages that are not a secure context, where crypto.subtle is missing).
//
// Node 20: install both packages where Node resolves them and import this file:
//   import { signedFetch, keyFromSeed } from './plait-sign.js';
//
// A browser, without a bundler: serve this file, @noble/ed25519's index.js and
// @noble/hashes' directory, and map the bare names with an import map placed before any
// module script:
//
//   <script type="importmap">
//   { "imports": {
//       "@noble/ed25519": "/vendor/noble-ed25519/index.js",
//       "@noble/hashes/": "/vendor/noble-hashes/"
//   } }
//   </script>
//   <script type="module">
//     import { signedFetch, generateKey } from '/plait-sign.js';
//     const key = generateKey();
//     await signedFetch('/~' + key.identity + '/hello', { method: 'PUT', body: 'hi' }, key);
//   </script>

import * as ed from '@noble/ed25519';
import { sha256, sha512 } from '@noble/hashes/sha2.js';

// @noble/ed25519's synchronous functions need a SHA-512; leave one set by the page alone.
if (!ed.hashes.sha512) ed.hashes.sha512 = sha512;

/** The label of the signature, as the server looks for it. */
export const LABEL = 'sig1';
/** The longest lifetime the server accepts, in seconds. */
export const MAX_TTL_SECS = 300;
/** The lifetime given when none is asked for, in seconds. */
export const DEFAULT_TTL_SECS = 60;

const ZBASE32 = 'ybndrfg8ejkmcpqxot1uwisza345h769';
const BODY_METHODS = new Set(['PUT', 'PATCH', 'POST']);
// A nonce goes into a Structured Field string; these characters need no escaping.
const NONCE_RE = /^[\x20\x21\x23-\x5b\x5d-\x7e]{1,128}$/;

/**
 * The identity (52 z-base-32 characters) of a 32-byte ed25519 public key: the same text as
 * Rust's `Identity` Display, the `keyid` of a signature and the namespace in `/~<id>/...`.
 */
export function identityOf(publicKey) {
  const bytes = toUint8(publicKey, 'publicKey');
  if (bytes.length !== 32) throw new RangeError('an ed25519 public key is 32 bytes');
  let out = '';
  let value = 0;
  let bits = 0;
  for (const b of bytes) {
    value = ((value << 8) | b) & 0xfff; // at most 12 bits are ever pending
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      out += ZBASE32[(value >>> bits) & 31];
    }
  }
  if (bits > 0) out += ZBASE32[(value << (5 - bits)) & 31];
  return out;
}

/**
 * The key whose secret is these 32 bytes (an ed25519 seed, as Rust's
 * `Keypair::from_secret_bytes` takes): `{ seed, publicKey, identity }`.
 */
export function keyFromSeed(bytes) {
  const seed = Uint8Array.from(toUint8(bytes, 'seed'));
  if (seed.length !== 32) throw new RangeError('an ed25519 seed is 32 bytes');
  const publicKey = ed.getPublicKey(seed);
  return Object.freeze({ seed, publicKey, identity: identityOf(publicKey) });
}

/** A fresh random key (see keyFromSeed). Keep its `seed` secret. */
export function generateKey() {
  return keyFromSeed(ed.utils.randomSecretKey());
}

/**
 * The headers to add to a request so that it is signed by `key`, as a plain object with
 * lower-case names: `signature-input`, `signature` and, when the body is covered,
 * `content-digest`.
 *
 * - `method`: the request's method (sent upper-case: signedFetch does so; pass the result
 *   of `.toUpperCase()` to other clients too, since fetch leaves `patch` lower-case).
 * - `url`: the URL the request goes to, absolute or relative to the page; any `#fragment`
 *   is left out, as fetch leaves it out.
 * - `headers`: the request's own headers (a Headers, an object or pairs), or null. They are
 *   not signed; the call refuses ones that would clash with the signature's.
 * - `body`: null or undefined, a string (sent as UTF-8), a Uint8Array or other
 *   ArrayBufferView, an ArrayBuffer or a Blob: the exact bytes that will be sent. It is
 *   covered whenever given, and always for PUT, PATCH and POST (none counts as empty).
 * - `key`: from keyFromSeed or generateKey.
 * - `options`: `{ created, ttl, nonce }` to fix the signing time (unix seconds), the
 *   lifetime in seconds (default 60, at most 300) or the nonce (default 16 random bytes,
 *   base64url); fixing the nonce is for tests: a nonce must never be used twice.
 */
export async function signRequest(method, url, headers, body, key, options = {}) {
  method = String(method).toUpperCase();
  if (!/^[!#$%&'*+\-.^_`|~0-9A-Z]+$/.test(method)) throw new TypeError(`bad method ${method}`);
  if (!key || !(key.seed instanceof Uint8Array) || typeof key.identity !== 'string') {
    throw new TypeError('key must come from keyFromSeed or generateKey');
  }
  for (const name of ['signature', 'signature-input', 'content-digest']) {
    if (hasHeader(headers, name)) throw new TypeError(`the request already has ${name}`);
  }
  const target = targetUri(url);
  const created = options.created ?? Math.floor(Date.now() / 1000);
  const ttl = options.ttl ?? DEFAULT_TTL_SECS;
  if (!Number.isSafeInteger(created) || created < 0) throw new RangeError('bad created time');
  if (!Number.isSafeInteger(ttl) || ttl < 0 || ttl > MAX_TTL_SECS) {
    throw new RangeError(`ttl must be 0 to ${MAX_TTL_SECS} seconds`);
  }
  const nonce = options.nonce ?? base64url(ed.etc.randomBytes(16));
  if (!NONCE_RE.test(nonce)) throw new RangeError('a nonce is 1 to 128 plain ASCII characters');

  let bytes = await bodyBytes(body);
  if (bytes === null && BODY_METHODS.has(method)) bytes = new Uint8Array(0);

  const add = {};
  const components = ['@method', '@target-uri'];
  const lines = [`"@method": ${method}`, `"@target-uri": ${target}`];
  if (bytes !== null) {
    add['content-digest'] = `sha-256=:${base64(sha256(bytes))}:`;
    components.push('content-digest');
    lines.push(`"content-digest": ${add['content-digest']}`);
  }
  const params =
    '(' + components.map((c) => `"${c}"`).join(' ') + ')' +
    `;created=${created};expires=${created + ttl}` +
    `;nonce="${nonce}";keyid="${key.identity}";alg="ed25519"`;
  lines.push(`"@signature-params": ${params}`);
  const base = new TextEncoder().encode(lines.join('\n'));
  add['signature-input'] = `${LABEL}=${params}`;
  add['signature'] = `${LABEL}=:${base64(ed.sign(base, key.seed))}:`;
  return add;
}

/**
 * `fetch(url, init)` signed by `key`: the method is sent upper-case and the signature
 * headers are added to `init.headers`. The body must be something signRequest can read
 * (not a stream or FormData).
 */
export async function signedFetch(url, init = {}, key) {
  const method = String(init.method ?? 'GET').toUpperCase();
  const add = await signRequest(method, url, init.headers, init.body, key);
  const headers = new Headers(init.headers);
  for (const [name, value] of Object.entries(add)) headers.set(name, value);
  return fetch(url, { ...init, method, headers });
}

function targetUri(url) {
  const base = globalThis.location?.href;
  const u = base === undefined ? new URL(url) : new URL(url, base);
  u.hash = '';
  return u.href;
}

function hasHeader(headers, name) {
  if (headers == null) return false;
  if (typeof headers.has === 'function') return headers.has(name);
  const entries = Symbol.iterator in Object(headers) ? headers : Object.entries(headers);
  for (const [k] of entries) if (String(k).toLowerCase() === name) return true;
  return false;
}

async function bodyBytes(body) {
  if (body === undefined || body === null) return null;
  if (typeof body === 'string') return new TextEncoder().encode(body);
  if (body instanceof Uint8Array) return body;
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (typeof Blob !== 'undefined' && body instanceof Blob) return new Uint8Array(await body.arrayBuffer());
  throw new TypeError('plait-sign: the body must be a string, bytes or a Blob, to be digested');
}

function toUint8(bytes, what) {
  if (bytes instanceof Uint8Array) return bytes;
  if (ArrayBuffer.isView(bytes)) return new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes instanceof ArrayBuffer || Array.isArray(bytes)) return new Uint8Array(bytes);
  throw new TypeError(`${what} must be bytes`);
}

function base64(bytes) {
  let s = '';
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function base64url(bytes) {
  return base64(bytes).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}
