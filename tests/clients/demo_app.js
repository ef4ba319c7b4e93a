// The microblog demo (web/demo) in a real browser (Debian's Chromium, driven by
// playwright-core), across two Plait instances joined in one network: one browser context
// per instance, each logged in as its owner. Each follows the other by id; a post on A
// appears live on B, B's reply to it appears under it on both, and a post on B appears on A.
//
//   node demo_app.js URL_A TOKEN_A URL_B TOKEN_B SCREENSHOT.png

const { chromium } = require('playwright-core')

const [urlA, tokenA, urlB, tokenB, shot] = process.argv.slice(2)
if (!shot) throw new Error('usage: node demo_app.js URL_A TOKEN_A URL_B TOKEN_B SCREENSHOT.png')

const fail = (why) => { console.error('FAIL: ' + why); process.exit(1) }
const T = { timeout: 20000 }

;(async () => {
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
               '--disable-component-update', '--disable-sync'],
    })
    const errors = []
    const open = async (url, token) => {
        const context = await browser.newContext({ viewport: { width: 720, height: 900 } })
        const page = await context.newPage()
        page.on('pageerror', e => errors.push(url + ': ' + e.message))
        // braid-http first offers to multiplex a page's subscriptions (a MULTIPLEX request);
        // a server that does not answers 405 and the client falls back to one connection
        // per subscription. That refusal is the browser's to log, not the page's error.
        page.on('console', m => {
            if (m.type() === 'error' && !/status of 405/.test(m.text())) errors.push(url + ': ' + m.text())
        })
        const res = await page.goto(url + '/#token=' + token)
        if (res.status() !== 200) fail(url + ' answered ' + res.status())
        await page.waitForFunction(() => /^[a-z0-9]{52}$/.test(document.querySelector('#me-id').textContent), null, T)
        // Logged in from the fragment, which is gone from the address bar.
        if (await page.locator('#owner').isHidden()) fail(url + ': not logged in')
        if (page.url().includes('token')) fail(url + ': the token stayed in the URL')
        return { page, id: await page.locator('#me-id').textContent() }
    }
    const follow = async (who, id) => {
        await who.page.fill('#follow-id', id)
        await who.page.click('#follow')
        await who.page.waitForFunction(id => document.querySelector(`#following li[data-id="${id}"]`), id, T)
    }
    const post = async (who, text) => {
        await who.page.fill('#compose', text)
        await who.page.click('#post')
    }
    // The article of the post with this text, on this page (as a CSS selector).
    const shows = (who, author, text, within = '') =>
        who.page.waitForFunction(([author, text, within]) =>
            [...document.querySelectorAll(`${within} .post[data-author="${author}"] > .text`)]
                .some(e => e.textContent === text), [author, text, within], T)
    try {
        const a = await open(urlA, tokenA)
        const b = await open(urlB, tokenB)
        if (a.id === b.id) fail('both pages show one instance')

        await a.page.fill('#name', 'Ann')
        await a.page.click('#name-form button[type=submit]')
        await b.page.fill('#name', 'Bob')
        await b.page.click('#name-form button[type=submit]')
        await follow(b, a.id)
        await follow(a, b.id)

        // A post on A: on A at once, then on B, live, through federation.
        await post(a, 'Hello from A')
        await shows(a, a.id, 'Hello from A')
        await shows(b, a.id, 'Hello from A')
        await b.page.waitForFunction(id => document.querySelector(`.post[data-author="${id}"] .author`).textContent === 'Ann', a.id, T)

        // B replies to it: the reply is B's post, shown under A's on both instances.
        const onB = b.page.locator(`.post[data-author="${a.id}"]`).filter({ hasText: 'Hello from A' }).first()
        await onB.locator(':scope > .reply').click()
        await onB.locator(':scope > .reply-form .reply-text').fill('Hi Ann, from B')
        await onB.locator(':scope > .reply-form button[type=submit]').click()
        const under = `.post[data-author="${a.id}"] > .replies`
        await shows(b, b.id, 'Hi Ann, from B', under)
        await shows(a, b.id, 'Hi Ann, from B', under)

        // And the other way: B's post reaches A.
        await post(b, 'Bob here, on instance B')
        await shows(a, b.id, 'Bob here, on instance B')
        await shows(b, b.id, 'Bob here, on instance B')

        // Nothing was written without the owner's token: a page logged out cannot post.
        const anon = await browser.newContext()
        const r = await (await anon.newPage()).request.put(urlA + '/posts', {
            headers: { 'Content-Type': 'application/json' }, data: '{"posts":{}}' })
        if (r.status() !== 401) fail('an anonymous write answered ' + r.status())

        if (errors.length) fail('errors in the pages: ' + errors.join('; '))
        await b.page.screenshot({ path: shot, fullPage: true })
        console.log('ok: a post on A reached B live, the reply showed on both, B\'s post reached A')
    } finally {
        await browser.close()
    }
})().catch(e => fail(e.stack || e.message))
