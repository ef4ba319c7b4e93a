// The admin dashboard in a real browser (Debian's Chromium, driven by playwright-core).
//
//   node dashboard.js BASE_URL LOGIN_LINK SCREENSHOT_PNG
//
// The Rust test (tests/tests/dashboard.rs) starts the server, writes /dash-watched and
// /dash-secret as the owner and prints a one-time link with `plait dashboard`. This
// script checks that:
//   1. a page without a credential shows the login form and reads nothing (401);
//   2. the one-time link logs the owner in, and works only once (a second browser, and a
//      plain POST of the same secret, are refused);
//   3. a subscription another client opens shows up on the dashboard (waited for, up to a
//      few seconds: a wait, not a timing assertion);
//   4. an access rule saved in the editor takes effect: an anonymous read of /dash-secret
//      is refused after the deny rule is saved, and allowed again once it is removed;
//   5. the page ran without errors; then it saves a screenshot.

const { chromium } = require('playwright-core')

const [base, link, shot] = process.argv.slice(2)
if (!base || !link || !shot) throw new Error('usage: node dashboard.js BASE_URL LOGIN_LINK SCREENSHOT_PNG')

const fail = (why) => { console.error('FAIL: ' + why); process.exit(1) }
const WAIT = { timeout: 10000 }

;(async () => {
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
               '--disable-component-update', '--disable-sync'],
    })
    let watcher
    try {
        // 1. No credential: the login form, and nothing readable.
        const stranger = await browser.newContext()
        const sp = await stranger.newPage()
        await sp.goto(base + '/.well-known/plait/dashboard/')
        await sp.waitForSelector('#login:not([hidden])', WAIT)
        if (await sp.isVisible('#main')) fail('the dashboard showed without a credential')
        const anon = await sp.evaluate(async () => (await fetch('/.well-known/plait/status/live')).status)
        if (anon !== 401) fail('a status resource answered ' + anon + ' without a credential')

        // 2. The one-time link logs in, once.
        const owner = await browser.newContext({ viewport: { width: 1360, height: 1000 } })
        const page = await owner.newPage()
        const errors = []
        page.on('pageerror', e => errors.push(e.message))
        page.on('console', m => { if (m.type() === 'error') errors.push(m.text()) })
        await page.goto(link)
        await page.waitForSelector('#main:not([hidden])', WAIT)
        await page.waitForFunction(() => document.querySelector('#conn').textContent === 'live', null, WAIT)
        if (page.url().includes('login=')) fail('the secret stayed in the address bar')
        await page.waitForFunction(() => document.querySelector('#overview').textContent.includes('Identity'), null, WAIT)

        const again = await browser.newContext()
        const ap = await again.newPage()
        await ap.goto(link)
        await ap.waitForSelector('#login:not([hidden])', WAIT)
        const said = await ap.textContent('#login-error')
        if (!said.includes('used')) fail('a second use of the link was not refused: ' + said)
        const secret = link.split('login=')[1]
        const replay = await fetch(base + '/.well-known/plait/dashboard/login', { method: 'POST', body: secret })
        if (replay.status !== 401) fail('replaying the link answered ' + replay.status)

        // 3. Another client subscribes; the dashboard shows it.
        const ac = new AbortController()
        const sub = await fetch(base + '/dash-watched', { headers: { Subscribe: 'true' }, signal: ac.signal })
        if (sub.status !== 209) fail('the watcher subscription answered ' + sub.status)
        watcher = { ac, reader: sub.body.getReader() }
        watcher.reader.read().catch(() => {})
        await page.waitForFunction(() => {
            for (const tr of document.querySelectorAll('#resources tbody tr')) {
                const [path, n] = [...tr.children].map(td => td.textContent)
                if (path === '/dash-watched' && Number(n) >= 1) return true
            }
            return false
        }, null, WAIT)

        // 4. An access rule edited in the editor takes effect.
        const anonRead = async () => (await fetch(base + '/dash-secret')).status
        if (await anonRead() !== 200) fail('/dash-secret is not readable before the rule')
        await page.waitForFunction(() => document.querySelector('#rules').value.includes('"rules"'), null, WAIT)
        const edit = async (change) => {
            const doc = JSON.parse(await page.inputValue('#rules'))
            change(doc)
            await page.fill('#rules', JSON.stringify(doc, null, 2))
            await page.click('#rules-save')
            await page.waitForFunction(() => ['saved', 'refused'].some(w => document.querySelector('#rules-status').textContent.startsWith(w)), null, WAIT)
            const status = await page.textContent('#rules-status')
            if (status !== 'saved') fail('saving the rules: ' + status)
        }
        await edit(doc => doc.rules.push({ path: '/dash-secret', deny: { read: ['everyone'] } }))
        const denied = await anonRead()
        if (denied !== 401) fail('after the deny rule an anonymous read answered ' + denied)
        // The refusal shows up among the recent ones.
        await page.waitForFunction(() => document.querySelector('#refusals').textContent.includes('/dash-secret'), null, WAIT)
        await edit(doc => { doc.rules = doc.rules.filter(r => r.path !== '/dash-secret') })
        const allowed = await anonRead()
        if (allowed !== 200) fail('after removing the rule an anonymous read answered ' + allowed)

        // 5. Let the graphs gather a few samples, then keep a picture.
        await page.waitForFunction(() => document.querySelectorAll('#graph-subscriptions polyline').length > 0, null, WAIT)
        await page.waitForTimeout(1500)
        await page.screenshot({ path: shot, fullPage: true })
        if (errors.length) fail('errors in the page: ' + errors.join('; '))
        console.log('dashboard ok: login once, nothing without it, live subscriptions, rule edits take effect')
    } finally {
        if (watcher) watcher.ac.abort()
        await browser.close()
    }
})().catch(e => fail(e.stack || String(e)))
