#!/usr/bin/env node
// Drives the real braid-http client (npm) against a plait server and checks what it sees.
//   node braid_interop.js http://127.0.0.1:PORT
// Exits 0 when every check passes; prints the first failure and exits 1 otherwise.
'use strict'
const { fetch: braid_fetch } = require('braid-http')

const base = process.argv[2]
if (!base) { console.error('usage: braid_interop.js BASE_URL'); process.exit(2) }
const deadline = (ms, what) => new Promise((_, rej) => setTimeout(() => rej(new Error('timeout: ' + what)), ms))
const check = (ok, msg) => { if (!ok) throw new Error(msg) }
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b)

// Applies Braid text patches ([start:end] in code points, absolute against the old state).
function apply (state, update) {
    if (!update.patches) return update.body_text
    const cps = [...state]
    let offset = 0
    for (const p of [...update.patches].sort((a, b) => parseInt(a.range.slice(1)) - parseInt(b.range.slice(1)))) {
        const [, a, b] = p.range.match(/\[(\d+):(\d+)\]/).map(Number)
        const content = [...p.content_text]
        cps.splice(a + offset, b - a, ...content)
        offset += content.length - (b - a)
    }
    return cps.join('')
}

async function subscribe (url, opts = {}) {
    const ac = new AbortController()
    const sub = { updates: [], state: opts.initial ?? '', errors: [], close: () => ac.abort() }
    const res = await braid_fetch(url, { subscribe: true, signal: ac.signal, ...opts.fetch })
    check(res.status === 209, `subscribe ${url}: status ${res.status}`)
    sub.res = res
    res.subscribe(u => {
        sub.updates.push(u)
        if (!opts.json) sub.state = apply(sub.state, u)
        else sub.state = u.body_text
    }, e => { if (!ac.signal.aborted) sub.errors.push(e) })
    sub.until = async (pred, what) => {
        const t0 = Date.now()
        while (!pred(sub)) {
            if (Date.now() - t0 > 5000) throw new Error(`timeout waiting for ${what}; state ${JSON.stringify(sub.state)}`)
            await new Promise(r => setTimeout(r, 10))
        }
    }
    return sub
}

async function put (url, params) {
    const res = await braid_fetch(url, { method: 'PUT', ...params })
    const text = await res.text()
    check(res.status === 200, `PUT ${url}: ${res.status} ${text}`)
    return res
}

async function main () {
    const doc = `${base}/interop/${Math.random().toString(36).slice(2)}`
    // Text: every PUT form the client has, seen live by a subscriber.
    const s = await subscribe(doc)
    await s.until(x => x.updates.length === 1, 'the initial snapshot')
    const r = await put(doc, { body: 'hello', headers: { 'content-type': 'text/plain' } })
    const v1 = JSON.parse('[' + r.headers.get('version') + ']')
    await s.until(x => x.state === 'hello', 'hello')
    check(same(s.updates.at(-1).version, v1), 'update version equals the PUT response Version')
    await put(doc, { version: ['bob-5'], parents: v1, patches: [{ unit: 'text', range: '[5:5]', content: ' world' }] })
    await put(doc, { version: ['carol-2'], parents: ['bob-5'], patches: [
        { unit: 'text', range: '[0:1]', content: 'H' }, { unit: 'text', range: '[11:11]', content: '!' }] })
    await put(doc, { version: ['dave-5'], parents: ['carol-2'], patches: [{ unit: 'text', range: '[5:11]', content: '' }] })
    await s.until(x => x.state === 'Hello!', 'Hello!')
    for (let i = 1; i < s.updates.length; i++)
        check(same(s.updates[i].parents, s.updates[i - 1].version), `update ${i} parents chain`)
    // Resume from an old version: only the missing part arrives.
    const r2 = await subscribe(doc, { initial: 'hello world', fetch: { parents: ['bob-5'] } })
    await r2.until(x => x.state === 'Hello!', 'resumed state')
    check(r2.updates[0].patches, 'resume sends patches, not a snapshot')
    // JSON: a statebus-style client.
    const jdoc = doc + '.json'
    const j = await subscribe(jdoc, { json: true, fetch: { headers: { accept: 'application/json' } } })
    await j.until(x => x.updates.length === 1, 'the initial 404')
    check(j.updates[0].status === '404' || j.updates[0].status === 404, 'a missing JSON resource is a 404 update, got ' + j.updates[0].status)
    await put(jdoc, { body: JSON.stringify({ messages: ['hi'] }), headers: { 'content-type': 'application/json' } })
    await j.until(x => x.state === '{"messages":["hi"]}', 'the JSON value')
    await put(jdoc, { patches: [{ unit: 'json', range: '.messages[1:1]', content: '["there"]' }] })
    await j.until(x => x.state === '{"messages":["hi","there"]}', 'the patched JSON value')
    for (const x of [s, r2, j]) { check(!x.errors.length, 'subscriber errors: ' + x.errors.join('; ')); x.close() }
    console.log('ok: braid-http against', base)
}

Promise.race([main(), deadline(30000, 'the whole run')]).then(() => process.exit(0), e => { console.error('FAIL:', e.message); process.exit(1) })
