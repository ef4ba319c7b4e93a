// A real browser (Debian's Chromium, driven by playwright-core) opens a page that follows
// many resources of one origin with the real braid-http client (tests/clients/mux_page),
// as a person's browser would:
//
//   node browser_mux.js BASE_URL N [mux|plain]
//
// Over HTTP/1.1 a browser opens at most six connections per origin, so without
// multiplexing the seventh request (a PUT included) never gets answered. This checks that
// every subscription gets its initial state and every live update, that writes from the
// page are answered while all of them are open, and how they travelled: through a
// multiplexer (`mux`, the client's default), or one request each (`plain`: the client's
// multiplexing off, which needs HTTP/2). Over HTTPS it reports the protocol the browser
// used. Chromium trusts the test's certificate only because this test says so.

const { chromium } = require('playwright-core')

const [base, nArg, mode = 'mux'] = process.argv.slice(2)
if (!base || !nArg) throw new Error('usage: node browser_mux.js BASE_URL N [mux|plain]')
const n = Number(nArg)
const t0 = Date.now()
const mark = (what) => console.error(`${what} at ${Date.now() - t0} ms`)
const fail = (why) => { console.error('FAIL: ' + why); process.exit(1) }

const path = (i) => (i % 2 === 0 ? `/mux/j${i}` : `/mux/t${i}`)
const value = (i, round) => (i % 2 === 0 ? JSON.stringify({ i, round }) : `text ${i} round ${round}`)

async function put (p, body) {
    const send = () => fetch(base + p, {
        method: 'PUT',
        headers: { 'Content-Type': p.startsWith('/mux/j') ? 'application/json' : 'text/plain' },
        body,
    })
    // After the test restarts the server, Node's pool may still hand out a connection to
    // the killed process ("fetch failed"): the same PUT again goes on a new one.
    const res = await send().catch(send)
    if (res.status !== 200) fail(`PUT ${p} answered ${res.status}`)
}

;(async () => {
    for (let i = 0; i < n; i++) await put(path(i), value(i, 0))

    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
               '--disable-component-update', '--disable-sync',
               ...(base.startsWith('https:') ? ['--ignore-certificate-errors'] : [])],
    })
    try {
        const page = await browser.newPage()
        const errors = []
        // After a restart (see below), the restart's own kinds of error are passed over
        // whenever they come: braid-http's late DELETEs keep arriving to the very end.
        let restarted = false
        const benign = m => /Failed to load resource: the server responded with a status of 404/.test(m) ||
            // A request still naming the dead multiplexer: 424, and the client makes a new one.
            /Failed to load resource: the server responded with a status of 424/.test(m) ||
            /ERR_CONNECTION_REFUSED/.test(m)
        page.on('pageerror', e => errors.push(e.message))
        // At any time: braid-http cancels a multiplexed request once its response has ended
        // (or when bytes come for one it has let go), and the server may have closed it
        // first; then the cancel is answered 404, as the reference server answers it, and
        // the client logs it. Nothing is lost: the response was whole. (CI saw it once,
        // before the restart.)
        const lateCancel = m => /Could not cancel multiplexed request: Error: status not ok: 404/.test(m)
        page.on('console', m => {
            if (m.type() === 'error' && !lateCancel(m.text()) && !(restarted && benign(m.text()))) {
                errors.push(m.text())
            }
        })
        let via293 = 0, muxOpened = 0
        page.on('response', r => {
            if (r.status() === 293) via293++
            if (r.url().includes('/.well-known/multiplexer/') && r.status() === 200 && r.request().method() !== 'DELETE') muxOpened++
        })

        const q = mode === 'plain' ? '&mux=off' : ''
        const res = await page.goto(`${base}/mux.html?n=${n}${q}`)
        if (res.status() !== 200) fail('the page answered ' + res.status())

        // Every subscription gets its state.
        const all = async (round, what) => {
            try {
                await page.waitForFunction(([n, round]) => window.paths.length === n && window.paths.every((p, i) =>
                    window.seen[p] === (i % 2 === 0 ? JSON.stringify({ i, round }) : `text ${i} round ${round}`)),
                    [n, round], { timeout: 30000 })
            } catch (e) {
                const state = await page.evaluate(() => ({ seen: Object.keys(window.seen).length, errors: window.errors }))
                fail(`${what}: ${state.seen} of ${n} subscriptions have a state; errors: ${state.errors.join('; ')}`)
            }
        }
        await all(0, 'initial states')
        mark('initial states')

        // Writes from the page are answered while every subscription is open, and come
        // back through the subscriptions.
        const writes = [0, 1, 2, 3, 4, 5, 6, 7].map(i => [path(i), value(i, 1)])
        const statuses = await Promise.race([
            page.evaluate(ws => Promise.all(ws.map(([p, b]) => window.put(p, b))), writes),
            new Promise(resolve => setTimeout(() => resolve(null), 30000)),
        ])
        mark('page writes')
        if (!statuses) fail('writes from the page were not answered while the subscriptions were open')
        if (statuses.some(s => s !== 200)) fail('writes from the page answered ' + statuses.join(','))
        for (let i = 8; i < n; i++) await put(path(i), value(i, 1))
        await all(1, 'live updates')
        mark('live updates')

        // With MUX_RESTART_DIR, the test restarts the server here (its multiplexer is gone,
        // its ids unknown): every subscription comes back, through a new multiplexer.
        const restartDir = process.env.MUX_RESTART_DIR
        if (restartDir) {
            const fs = require('fs')
            const errorsBefore = errors.length
            fs.writeFileSync(restartDir + '/ready', '')
            for (let i = 0; !fs.existsSync(restartDir + '/restarted'); i++) {
                if (i > 600) fail('the server was not restarted')
                await new Promise(r => setTimeout(r, 100))
            }
            for (let i = 0; i < n; i++) await put(path(i), value(i, 2))
            await all(2, 'updates after the restart')
            const after = await page.evaluate(ws => Promise.all(ws.map(([p, b]) => window.put(p, b))),
                                              [[path(0), value(0, 3)], [path(1), value(1, 3)]])
            if (after.some(s => s !== 200)) fail('writes after the restart answered ' + after.join(','))
            mark('after the restart')
            // While the server was away the browser logged refused connections, and
            // braid-http 1.3 logs its DELETEs of requests on the dead multiplexer (which the
            // new server does not know: 404), and a late request through it is answered 424
            // (the browser logs it), some of them later than this: what came until
            // now is dropped, and those kinds from now on (in the console handler, so that
            // none arriving later slips through); the page's own errors are in window.errors.
            errors.length = errorsBefore
            restarted = true
        }

        const info = await page.evaluate(() => ({
            multiplexed: window.multiplexed,
            errors: window.errors,
            protocols: [...new Set(performance.getEntriesByType('resource')
                .filter(e => e.name.includes('/mux/')).map(e => e.nextHopProtocol))],
        }))
        if (info.errors.length) fail('subscription errors: ' + info.errors.join('; '))
        if (errors.length) fail('errors in the page: ' + errors.join('; '))
        console.log(JSON.stringify({
            ok: true, subscriptions: n, page_writes: writes.length, multiplexed: info.multiplexed,
            responses_293: via293, multiplexers_opened: muxOpened, protocols: info.protocols,
        }))
    } finally {
        await browser.close()
        mark('browser closed')
    }
})().then(() => process.exit(0), e => fail(e.stack || String(e)))
