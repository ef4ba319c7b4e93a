// Stored HTML is no active content on the server's origin. Debian's Chromium (driven by
// playwright-core) opens two pages of one Plait origin:
//
//   node stored_html.js BASE_URL STATE_PATH FILE_PATH
//
// STATE_PATH is HTML written through the API (as anyone allowed to write could); FILE_PATH
// is the same HTML served from --web-dir (the owner's own page). Each page's script tries to
// mark the document and to reach the origin's storage and cookies. The owner's page must
// run (so a broken browser set-up cannot pass this); the stored one must not run at all.

const { chromium } = require('playwright-core')

const [base, statePath, filePath] = process.argv.slice(2)
if (!filePath) throw new Error('usage: node stored_html.js BASE_URL STATE_PATH FILE_PATH')

const fail = (why) => { console.error('FAIL: ' + why); process.exit(1) }

;(async () => {
    const browser = await chromium.launch({
        executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
        args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--disable-background-networking',
               '--disable-component-update', '--disable-sync'],
    })
    try {
        const page = await browser.newPage()
        const outcome = async (path) => {
            const res = await page.goto(base + path)
            if (res.status() !== 200) fail(path + ' answered ' + res.status())
            // Give a script time to run.
            await page.waitForTimeout(300)
            return page.evaluate(() => ({
                ran: document.body && document.body.dataset.ran === 'yes',
                origin: String(window.origin),
            }))
        }
        const own = await outcome(filePath)
        if (!own.ran) fail('the owner\'s page did not run its script: ' + JSON.stringify(own))
        const stored = await outcome(statePath)
        if (stored.ran) fail('stored HTML ran a script on the origin: ' + JSON.stringify(stored))
        if (stored.origin !== 'null') fail('stored HTML has the server\'s origin: ' + stored.origin)
        console.log('ok: the owner\'s page ran, stored HTML did not (origin ' + stored.origin + ')')
    } finally {
        await browser.close()
    }
})().catch(e => fail(e.stack || String(e)))
