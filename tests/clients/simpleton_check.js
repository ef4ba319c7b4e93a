// Runs braid-text's own simpleton client against a running plait.
//
// braid-text is not on the npm registry, so its client is not in this repository: give
// the path of its `simpleton-sync.js` (braid-text 0.3.17 to 0.5.6 run on braid-http 1.3;
// later ones need a braid-http with `reliable_update_channel`):
//
//   SIMPLETON_CLIENT_JS=/path/to/simpleton-sync.js node simpleton_check.js http://127.0.0.1:7600 [PAIRS] [SECONDS]
//
// 1. PAIRS times (default 20): two clients edit "hello" concurrently, as in the braid
//    conformance judge, and must both reach "B hello A" with the server.
// 2. For SECONDS (default 10): five clients make random edits every 5-50 ms and now and
//    then drop their subscription for a while; after they settle, every client must hold
//    the server's text.
// Exits 0 when every round converged with no client errors.

var fs = require('fs')
var braid_fetch = require('braid-http').fetch
var src = fs.readFileSync(process.env.SIMPLETON_CLIENT_JS, 'utf8')
var simpleton_client = new Function('braid_fetch', src + '\n;return simpleton_client')(braid_fetch)

var BASE = process.argv[2]
var PAIRS = +(process.argv[3] || 20)
var SECONDS = +(process.argv[4] || 10)
var sleep = ms => new Promise(r => setTimeout(r, ms))
var pick = (a, b) => a + Math.floor(Math.random() * (b - a + 1))
var server_text = async url => (await fetch(url)).text()

async function until (pred, ms) {
    for (var t0 = Date.now(); Date.now() - t0 < ms; await sleep(20))
        if (await pred()) return true
    return false
}

// A text box bound to one simpleton client; `online` once its first state arrived. A
// restart binds a new client to a new box: a stopped client may still be sending its last
// edits, and must keep seeing its own text, not the new client's.
function editor (url) {
    var e = {online: false, errors: [], client: null, box: {text: ''}}
    Object.defineProperty(e, 'text', {get: () => e.box.text, set: t => { e.box.text = t }})
    e.start = () => {
        var box = e.box = {text: e.box.text}
        e.online = false
        e.client = simpleton_client(url, {
            get_state: () => box.text,
            on_state: s => { box.text = s; if (e.box === box) e.online = true },
            on_error: err => { if (!/abort/i.test(String(err && (err.name + err.message)))) e.errors.push(String(err)) },
        })
    }
    e.stop = () => { e.online = false; (e.client.abort || e.client.stop)() }
    e.start()
    return e
}

async function pair (i) {
    var url = `${BASE}/simpleton-check-${Date.now()}-${i}`
    var A = editor(url), B = editor(url)
    try {
        await until(() => A.online && B.online, 5000)
        A.text = 'hello'; A.client.changed()
        await until(() => B.text === 'hello', 5000)
        A.text = 'hello A'; A.client.changed()
        B.text = 'B hello'; B.client.changed()
        await until(async () => A.text === B.text && A.text.length === 9 && await server_text(url) === A.text, 5000)
        var server = await server_text(url)
        var errors = A.errors.concat(B.errors)
        if (A.text === 'B hello A' && B.text === A.text && server === A.text && !errors.length) return null
        return `A=${JSON.stringify(A.text)} B=${JSON.stringify(B.text)} server=${JSON.stringify(server)} errors=${errors}`
    } finally { A.stop(); B.stop() }
}

async function fuzz () {
    var url = `${BASE}/simpleton-fuzz-${Date.now()}`
    var eds = [0, 1, 2, 3, 4].map(() => editor(url))
    await until(() => eds.every(e => e.online), 5000)
    var edits = 0, drops = 0, end = Date.now() + SECONDS * 1000
    await Promise.all(eds.map(async e => {
        while (Date.now() < end) {
            await sleep(pick(5, 50))
            if (!e.online) continue
            if (Math.random() < 0.05) {
                drops++; e.stop()
                setTimeout(() => e.start(), pick(100, 500))
                continue
            }
            var t = e.text, at = pick(0, t.length)
            if (t.length && Math.random() < 0.33) {
                at = Math.min(at, t.length - 1)
                e.text = t.slice(0, at) + t.slice(at + pick(1, 3))
            } else {
                e.text = t.slice(0, at) + 'abcdefghij'[pick(0, 9)] + 'é😀'.slice(0, pick(0, 1)) + t.slice(at)
            }
            e.client.changed(); edits++
        }
    }))
    await until(() => eds.every(e => e.online), 5000)
    var ok = await until(async () => { var s = await server_text(url); return eds.every(e => e.text === s) }, 15000)
    var server = await server_text(url)
    var errors = [].concat(...eds.map(e => e.errors))
    eds.forEach(e => e.stop())
    console.log(`fuzz: ${edits} edits, ${drops} dropped subscriptions, server text ${[...server].length} code points`)
    if (ok && !errors.length) return null
    return eds.map((e, i) => `client ${i}: ${e.text === server ? 'same' : 'DIFFERS ' + JSON.stringify(e.text.slice(0, 60))}`).join('; ')
        + (errors.length ? ` errors: ${errors.join('; ')}` : '')
}

;(async () => {
    var failed = 0
    for (var i = 0; i < PAIRS; i++) {
        var r = await pair(i)
        if (r) { failed++; console.log(`pair ${i}: FAIL ${r}`) }
    }
    console.log(`pairs: ${PAIRS - failed}/${PAIRS} converged`)
    var f = SECONDS > 0 ? await fuzz() : null
    if (f) { failed++; console.log('fuzz: FAIL ' + f) } else if (SECONDS > 0) console.log('fuzz: all clients converged')
    process.exit(failed ? 1 : 0)
})()
