#!/usr/bin/env node
// The statebus 7.2.6 node client (npm) against plait, over the websocket.
//   node statebus_v7.js BASE_URL live            two clients: set/get, pushes, forget, delete,
//                                                nested keys, accounts, closet rules
//   node statebus_v7.js BASE_URL before-restart  log in as a fixed client and write
//   node statebus_v7.js BASE_URL after-restart   the same client is still logged in, data kept
// Exits 0 when every check passes; prints the first failure and exits 1 otherwise.
'use strict'
const statebus = require('statebus')
const [base, phase] = process.argv.slice(2)
if (!base || !phase) { console.error('usage: statebus_v7.js BASE_URL PHASE'); process.exit(2) }
// http: → ws:, https: → wss: (statebus' own spellings of them)
const ws = base.replace(/^http:/, 'statei:').replace(/^https:/, 'state:')
const quiet = console.log
console.log = (...a) => { const s = require('util').format(...a); if (!/^(\[[ *]\] |Reconnect|retrying)/.test(s)) quiet(...a) }
const check = (ok, msg) => { if (!ok) throw new Error(msg) }
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b)
const sleep = ms => new Promise(r => setTimeout(r, ms))
async function until (pred, what, ms = 5000) {
    const t0 = Date.now()
    while (true) {
        try { if (pred()) return } catch (e) {}
        if (Date.now() - t0 > ms) throw new Error('timeout waiting for ' + what)
        await sleep(20)
    }
}
const handles = []
function client (creds) {
    const bus = statebus()
    bus.honk = false
    if (creds) bus.client_creds = () => creds
    handles.push(bus.ws_mount('/*', ws))
    return bus
}
async function open (bus) { await until(() => bus.cache.peers[ws].connected, 'websocket open') }
const run = Math.random().toString(36).slice(2, 8)
const K = k => `/v7-${run}/${k}`

async function live () {
    const a = client(), b = client()
    await open(a); await open(b)
    // set on A, get on B; live pushes; key order kept.
    a.set({key: K('doc'), val: {title: 'hi', n: 1, tags: ['x']}})
    let seen = []
    b.get(K('doc'), o => { if ('val' in o) seen.push(JSON.parse(JSON.stringify(o.val))) })
    await until(() => seen.some(v => same(v, {title: 'hi', n: 1, tags: ['x']})), 'B sees the doc')
    a.set({key: K('doc'), val: {title: 'hi', n: 2, tags: ['x', 'y']}})
    await until(() => seen.some(v => v.n === 2), 'B sees the update')
    // An unchanged value is not pushed again.
    const count = seen.length
    a.set({key: K('doc'), val: {title: 'hi', n: 2, tags: ['x', 'y']}})
    await sleep(300)
    check(seen.length === count, 'an unchanged value was pushed again')
    // forget stops pushes.
    const seenF = []
    const cb = o => { if ('val' in o) seenF.push(o.val) }
    b.get(K('f'), cb)
    await sleep(150)
    a.set({key: K('f'), val: 1})
    await until(() => seenF.includes(1), 'forget: first value')
    b.forget(K('f'), cb)
    await sleep(500)
    a.set({key: K('f'), val: 2})
    await sleep(400)
    check(!seenF.includes(2), 'an update arrived after forget')
    // delete really deletes, and tells subscribers.
    let gone = null
    b.get(K('del'), o => { gone = o })
    a.set({key: K('del'), val: 'doomed'})
    await until(() => gone && gone.val === 'doomed', 'B sees the value to delete')
    a.delete(K('del'))
    await until(() => gone && !('val' in gone), 'B told of the delete')
    // Nested states become their own keys.
    a.set({key: K('parent'), val: {child: {key: K('child'), val: 'kid'}}})
    let child
    b.get(K('child'), o => { child = o })
    await until(() => child && child.val === 'kid', 'the nested state as its own key')
    // Accounts: create, log in, own profile, closet space, logout.
    const name = 'u' + run, pass = 'pw-' + run
    let cu
    a(() => { cu = a.get('/current_user') })
    await until(() => cu && cu.val, 'current_user')
    a.set({key: '/current_user', val: {create_account: {name, pass, email: name + '@example.com'}}})
    await sleep(300)
    a.set({key: '/current_user', val: {login_as: {name, pass}}})
    await until(() => cu.val.logged_in === true, 'logged in')
    check(cu.val.user.link === '/@' + name, 'user link ' + JSON.stringify(cu.val.user))
    a.set({key: `/@${name}/notes`, val: 'mine'})
    a.set({key: `/@${name}/private/diary`, val: 'secret'})
    b.set({key: `/@${name}/intrusion`, val: 'nope'})
    await sleep(400)
    let notes, diary, intrusion
    b.get(`/@${name}/notes`, o => { notes = o })
    b.get(`/@${name}/private/diary`, o => { diary = o })
    b.get(`/@${name}/intrusion`, o => { intrusion = o })
    await until(() => notes && diary && intrusion, 'closet reads')
    check(notes.val === 'mine', 'the owner\'s closet write: ' + JSON.stringify(notes))
    check(!('val' in diary), 'someone else read a private key: ' + JSON.stringify(diary))
    check(!('val' in intrusion), 'someone else wrote in a closet: ' + JSON.stringify(intrusion))
    let mine
    a.get(`/@${name}/private/diary`, o => { mine = o })
    await until(() => mine && mine.val === 'secret', 'the owner reads their private key')
    a.set({key: '/current_user', val: {logout: true}})
    await until(() => cu.val.logged_in === false, 'logged out')
}

const fixed = {clientid: 'fixedclient0123456789abcdef', name: 'restart-user', pass: 'restart-pass'}
async function before () {
    const a = client({clientid: fixed.clientid})
    await open(a)
    let cu
    a(() => { cu = a.get('/current_user') })
    await until(() => cu && cu.val, 'current_user')
    a.set({key: '/current_user', val: {create_account: {name: fixed.name, pass: fixed.pass}}})
    await sleep(300)
    a.set({key: '/current_user', val: {login_as: {name: fixed.name, pass: fixed.pass}}})
    await until(() => cu.val.logged_in === true, 'logged in before the restart')
    a.set({key: '/kept', val: {through: 'restart'}})
    a.set({key: `/@${fixed.name}/kept`, val: 'closet'})
    await sleep(400)
}

async function after () {
    const a = client({clientid: fixed.clientid})
    await open(a)
    let cu, kept, closet
    a(() => { cu = a.get('/current_user') })
    a.get('/kept', o => { kept = o })
    a.get(`/@${fixed.name}/kept`, o => { closet = o })
    await until(() => cu && cu.val && cu.val.logged_in === true, 'the session survived the restart')
    await until(() => kept && same(kept.val, {through: 'restart'}), 'data survived the restart')
    await until(() => closet && closet.val === 'closet', 'closet data survived the restart')
}

const phases = {live, 'before-restart': before, 'after-restart': after}
Promise.race([phases[phase](), sleep(40000).then(() => { throw new Error('the whole run timed out') })])
    .then(() => { console.error('ok: statebus 7.2.6 ' + phase); handles.forEach(h => h.close()); process.exit(0) },
          e => { console.error('FAIL:', e.message); process.exit(1) })
