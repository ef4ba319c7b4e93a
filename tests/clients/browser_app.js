// A real browser (Debian's Chromium, driven by playwright-core) loads an app that Plait
// serves on one origin: its page and scripts from --web-dir, its API through --proxy, and
// its state from Plait itself, live, with the real braid-http client running in the page.
//
//   node browser_app.js BASE_URL
//
// The page (written by the Rust test) shows the API's answer in #api and the live state of
// /todos in #todos, and writes to /todos itself. This script checks that the page's own
// write comes back to it, that a write from outside (Node's fetch) reaches it live, and
// that a reload revalidates the page instead of fetching it again.

const { chromium } = require('playwright-core')

const base = process.argv[2]
if (!base) throw new Error('usage: node browser_app.js BASE_URL')

const fail = (why) => { console.error('FAIL: ' + why); process.exit(1) }

;(async () => {
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
               '--disable-component-update', '--disable-sync'],
    })
    try {
        const page = await browser.newPage()
        const errors = []
        page.on('pageerror', e => errors.push(e.message))
        page.on('console', m => { if (m.type() === 'error') errors.push(m.text()) })
        const statuses = {}
        page.on('response', r => { statuses[new URL(r.url()).pathname] = r.status() })

        const res = await page.goto(base + '/')
        if (res.status() !== 200) fail('the page answered ' + res.status())

        // The API, through the proxy, on the same origin.
        await page.waitForFunction(() => document.querySelector('#api').textContent === 'origin', null, { timeout: 10000 })
        // The page's own write, back through its subscription.
        await page.waitForFunction(() => document.querySelector('#todos').textContent.includes('milk'), null, { timeout: 10000 })

        // A write from elsewhere reaches the page live.
        const put = await fetch(base + '/todos', {
            method: 'PUT',
            headers: { 'Content-Type': 'application/json' },
            body: JSON.stringify([{ t: 'milk' }, { t: 'eggs' }]),
        })
        if (put.status !== 200) fail('outside PUT answered ' + put.status)
        await page.waitForFunction(() => document.querySelector('#todos').textContent.includes('eggs'), null, { timeout: 10000 })

        // Everything came from one origin.
        const origins = await page.evaluate(() => performance.getEntriesByType('resource').map(e => new URL(e.name).origin))
        for (const o of origins) if (o !== new URL(base).origin) fail('a request left the origin: ' + o)

        // A reload revalidates: the server answers the page with 304 (the browser shows 200
        // from its cache, so ask the server the way the browser does).
        const etag = res.headers()['etag']
        if (!etag) fail('the page has no ETag')
        const again = await fetch(base + '/', { headers: { 'If-None-Match': etag } })
        if (again.status !== 304) fail('revalidation answered ' + again.status)

        if (errors.length) fail('errors in the page: ' + errors.join('; '))
        console.log('browser app ok: api=origin, live state, ' + origins.length + ' same-origin resources')
    } finally {
        await browser.close()
    }
})().catch(e => fail(e.stack || String(e)))
