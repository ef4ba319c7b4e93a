#!/usr/bin/env node
// The statebus 6.0.38 node client (npm, as `statebus6`) against plait: the v6 dialect
// (fetch/save, flat states, accounts at user/<name>).
//   node statebus_v6.js BASE_URL
'use strict'
const statebus = require('statebus6')
const base = process.argv[2]
if (!base) { console.error('usage: statebus_v6.js BASE_URL'); process.exit(2) }
const ws = base.replace(/^http:/, 'statei:')
const quiet = console.log
console.log = (...a) => { const s = require('util').format(...a); if (!/^(\[[ *]\] |Reconnect|retrying)/.test(s)) quiet(...a) }
const check = (ok, msg) => { if (!ok) throw new Error(msg) }
const sleep = ms => new Promise(r => setTimeout(r, ms))
async function until (pred, what, ms = 5000) {
    const t0 = Date.now()
    while (true) {
        try { if (pred()) return } catch (e) {}
        if (Date.now() - t0 > ms) throw new Error('timeout waiting for ' + what)
        await sleep(20)
    }
}
function client () {
    const bus = statebus()
    bus.honk = false
    bus.ws_client('/*', ws)
    return bus
}
const run = Math.random().toString(36).slice(2, 8)
const K = k => `/v6-${run}/${k}`

async function main () {
    const a = client(), b = client()
    await sleep(300)
    // save on A, fetch on B, live pushes of flat states.
    a.save({key: K('k1'), n: 1, s: 'hello', list: [1, {x: true}]})
    let got = null
    b.fetch(K('k1'), o => { got = JSON.parse(JSON.stringify(o)) })
    await until(() => got && got.n === 1 && got.s === 'hello', 'B fetches k1 ' + JSON.stringify(got))
    a.save({key: K('k1'), n: 2, s: 'hello', list: [1, {x: true}]})
    await until(() => got.n === 2, 'B sees the push')
    // forget stops pushes.
    const seen = []
    const cb = o => { if ('v' in o) seen.push(o.v) }
    b.fetch(K('f'), cb)
    await sleep(200)
    a.save({key: K('f'), v: 1})
    await until(() => seen.includes(1), 'first value')
    b.forget(K('f'), cb)
    await sleep(500)
    a.save({key: K('f'), v: 2})
    await sleep(400)
    check(!seen.includes(2), 'an update arrived after forget')
    // delete tells subscribers.
    let d = null
    b.fetch(K('d'), o => { d = JSON.parse(JSON.stringify(o)) })
    a.save({key: K('d'), v: 'doomed'})
    await until(() => d && d.v === 'doomed', 'value to delete')
    a.del(K('d'))
    await until(() => d && !('v' in d), 'B told of the delete ' + JSON.stringify(d))
    // Accounts: create and log in; the v6 current_user embeds the user object.
    const name = 'v6u' + run, pass = 'pw' + run
    let cu = null
    a.fetch('/current_user', o => { cu = JSON.parse(JSON.stringify(o)) })
    await until(() => cu && 'logged_in' in cu, 'current_user ' + JSON.stringify(cu))
    a.save({key: '/current_user', create_account: {name, pass, email: name + '@example.com'}})
    await sleep(400)
    a.save({key: '/current_user', login_as: {name, pass}})
    await until(() => cu.logged_in === true, 'logged in ' + JSON.stringify(cu))
    check(cu.user && cu.user.key === '/user/' + name && cu.user.name === name, 'v6 user object ' + JSON.stringify(cu.user))
    let u = null
    b.fetch('/user/' + name, o => { u = JSON.parse(JSON.stringify(o)) })
    await until(() => u && u.name === name, 'the user object as another client')
    check(!('pass' in u) && !('email' in u), 'private fields shown: ' + JSON.stringify(u))
}

Promise.race([main(), sleep(40000).then(() => { throw new Error('the whole run timed out') })])
    .then(() => { console.error('ok: statebus 6.0.38'); process.exit(0) },
          e => { console.error('FAIL:', e.message); process.exit(1) })
