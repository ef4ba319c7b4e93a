// The dashboard's Braid subscription reader (web/dashboard/braid.js) on a stream split at
// every byte: each block comes out whole, once, in order, whatever the chunking; heartbeats
// between blocks are skipped; a patch block is refused rather than misread.
//
//   node dashboard_braid.mjs

import { readFileSync } from 'node:fs'

const src = readFileSync(new URL('../../web/dashboard/braid.js', import.meta.url), 'utf8')
const { parseBlocks } = await import('data:text/javascript,' + encodeURIComponent(src))

const fail = (why) => { console.error('FAIL: ' + why); process.exit(1) }
const enc = new TextEncoder()
const block = (v, body) => `HTTP 200 OK\r\nVersion: "live.1-${v}"\r\nParents: "live.1-${v - 1}"\r\nContent-Length: ${enc.encode(body).length}\r\n\r\n${body}\r\n\r\n`
const bodies = ['{"a":1}', '{"path":"/ünïcode","n":2}', '{"empty\\r\\n":"\\r\\n\\r\\n"}']
const wire = enc.encode(bodies.map((b, i) => block(i + 2, b)).join('\r\n'))

const concat = (a, b) => { const o = new Uint8Array(a.length + b.length); o.set(a); o.set(b, a.length); return o }
for (let cut = 1; cut <= wire.length; cut++) {
    let buf = new Uint8Array(0)
    const got = []
    for (let at = 0; at < wire.length; at += cut) {
        buf = concat(buf, wire.subarray(at, at + cut))
        const [blocks, rest] = parseBlocks(buf)
        buf = rest.slice()
        got.push(...blocks)
    }
    if (got.length !== bodies.length) fail(`chunks of ${cut}: ${got.length} blocks`)
    got.forEach((b, i) => {
        if (b.body !== bodies[i]) fail(`chunks of ${cut}: block ${i} is ${JSON.stringify(b.body)}`)
        if (b.version !== `"live.1-${i + 2}"` || b.status !== '200') fail(`chunks of ${cut}: block ${i} head ${JSON.stringify(b)}`)
    })
}
let refused = false
try { parseBlocks(enc.encode('HTTP 200 OK\r\nVersion: "x-1"\r\nPatches: 1\r\n\r\n')) } catch { refused = true }
if (!refused) fail('a patch block was not refused')
console.log(`braid.js ok: ${wire.length} chunkings`)
