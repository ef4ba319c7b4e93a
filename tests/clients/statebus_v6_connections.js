#!/usr/bin/env node
// The statebus 6.0.38 node client (npm, as `statebus6`) reading plait's live connection
// states: `/connections` lists every open connection (and who is logged in on it),
// `/connection` is the asker's own record; both change as connections come and go. Then
// it saves a flat state with fields, for the caller to read back over plain HTTP.
//   node statebus_v6_connections.js BASE_URL SAVED_KEY
'use strict'
const statebus = require('statebus6')
const WebSocket = require('websocket').w3cwebsocket
const base = process.argv[2], savedKey = process.argv[3]
if (!base || !savedKey) { console.error('usage: statebus_v6_connections.js BASE_URL SAVED_KEY'); process.exit(2) }
const ws = base.replace(/^http:/, 'ws:')
const quiet = console.log
console.log = (...a) => { const s = require('util').format(...a); if (!/^(\[[ *]\] |Reconnect|retrying)/.test(s)) quiet(...a) }
const check = (ok, msg) => { if (!ok) throw new Error(msg) }
const sleep = ms => new Promise(r => setTimeout(r, ms))
const copy = o => JSON.parse(JSON.stringify(o))
async function until (pred, what, ms = 5000) {
    const t0 = Date.now()
    while (true) {
        try { if (pred()) return } catch (e) {}
        if (Date.now() - t0 > ms) throw new Error('timeout waiting for ' + what)
        await sleep(20)
    }
}
// A bus on its own websocket, as `ws_client` makes one, keeping the handle to close it.
function client () {
    const bus = statebus()
    bus.honk = false
    const clientid = Math.random().toString(36).slice(2) + Math.random().toString(36).slice(2)
    const handle = bus.net_client('/*', ws,
        url => new WebSocket(url + '/_connect_to_statebus_/websocket'),
        send_login_info => send_login_info(clientid))
    return {bus, handle}
}
const run = Math.random().toString(36).slice(2, 8)
const ids = conns => (conns && conns.all || []).map(c => c.id)

async function main () {
    const a = client(), b = client()
    // Each connection's own record: its id, and `client` the same id.
    let meA = null, meB = null
    a.bus.fetch('/connection', o => { meA = copy(o) })
    b.bus.fetch('/connection', o => { meB = copy(o) })
    await until(() => meA && meA.id && meB && meB.id, 'own connection records ' + JSON.stringify([meA, meB]))
    check(meA.id !== meB.id, 'two connections, one id: ' + meA.id)
    check(meA.client === meA.id && meB.client === meB.id, 'client is the connection id: ' + JSON.stringify([meA, meB]))
    check(!('user' in meA), 'a user on a connection not logged in: ' + JSON.stringify(meA))

    // Everyone's: A sees both.
    let all = null
    a.bus.fetch('/connections', o => { all = copy(o) })
    await until(() => ids(all).includes(meA.id) && ids(all).includes(meB.id), 'A sees A and B in /connections ' + JSON.stringify(all))

    // B logs in: A sees who is on B's connection; B's own record says so too.
    const name = 'conn' + run, pass = 'pw' + run
    let cu = null
    b.bus.fetch('/current_user', o => { cu = copy(o) })
    await until(() => cu && 'logged_in' in cu, 'current_user')
    b.bus.save({key: '/current_user', create_account: {name, pass, email: name + '@example.com'}})
    await sleep(300)
    b.bus.save({key: '/current_user', login_as: {name, pass}})
    await until(() => cu.logged_in === true, 'B logged in ' + JSON.stringify(cu))
    const entryOf = id => (all.all || []).find(c => c.id === id)
    await until(() => entryOf(meB.id).user.name === name, 'A sees B\'s user ' + JSON.stringify(all))
    check(!('email' in entryOf(meB.id).user), 'another\'s email shown: ' + JSON.stringify(entryOf(meB.id)))
    check(!entryOf(meA.id).user, 'A is not logged in: ' + JSON.stringify(entryOf(meA.id)))
    await until(() => meB.user && meB.user.name === name, 'B\'s own record names its user ' + JSON.stringify(meB))

    // A third connection comes and goes; B goes: A's list follows.
    const c = client()
    let meC = null
    c.bus.fetch('/connection', o => { meC = copy(o) })
    await until(() => meC && meC.id, 'C\'s own record')
    await until(() => ids(all).includes(meC.id), 'A sees C arrive ' + JSON.stringify(all))
    c.handle.close()
    await until(() => !ids(all).includes(meC.id), 'A sees C leave ' + JSON.stringify(all))
    b.handle.close()
    await until(() => !ids(all).includes(meB.id), 'A sees B leave ' + JSON.stringify(all))
    check(ids(all).includes(meA.id), 'A is still there: ' + JSON.stringify(all))

    // A flat state with fields, saved for the caller to GET over plain HTTP.
    a.bus.save({key: '/' + savedKey, n: 1, s: 'hello', list: [1, {x: true}]})
    let back = null
    a.bus.fetch('/' + savedKey, o => { back = copy(o) })
    await until(() => back && back.s === 'hello', 'the saved state')
    // Read by another connection over the websocket, it is the same flat state.
    const d = client()
    let seen = null
    d.bus.fetch('/' + savedKey, o => { seen = copy(o) })
    await until(() => seen && seen.n === 1 && seen.s === 'hello', 'D reads the saved state ' + JSON.stringify(seen))
    check(JSON.stringify(seen.list) === '[1,{"x":true}]', 'fields as saved: ' + JSON.stringify(seen))
}

Promise.race([main(), sleep(40000).then(() => { throw new Error('the whole run timed out') })])
    .then(() => { console.error('ok: statebus 6.0.38 connections'); process.exit(0) },
          e => { console.error('FAIL:', e.message); process.exit(1) })
