// A page as an app developer writes one: many live resources from one origin, followed
// with the real braid-http client, and writes from the page. Half are JSON documents
// (whole bodies), half text read as simpleton does (patches applied to the text).
//
//   /mux.html?n=50           the client multiplexes (its default in browsers)
//   /mux.html?n=50&mux=off   one request per subscription (what HTTP/2 alone gives)

const params = new URLSearchParams(location.search)
const n = Number(params.get('n') || 50)
if (params.get('mux') === 'off') braid_fetch.enable_multiplex = false

window.paths = []
window.seen = {}          // path → its latest state, as text
window.multiplexed = 0    // subscriptions whose response came through a multiplexer
window.errors = []

// A text patch's range is in code points: `[start:end]`.
function apply (text, patches) {
    for (const p of patches) {
        const m = /\[(\d+):(\d+)\]/.exec(p.range)
        const cps = [...text]
        text = cps.slice(0, +m[1]).join('') + p.content_text + cps.slice(+m[2]).join('')
    }
    return text
}

async function follow (path, json) {
    const res = await braid_fetch(path, {
        subscribe: true,
        retry: true,
        headers: json ? { Accept: 'application/json' } : { 'Merge-Type': 'simpleton' },
    })
    if (res.multiplexed_through) window.multiplexed++
    res.subscribe(
        u => {
            window.seen[path] = u.body != null ? u.body_text : apply(window.seen[path] ?? '', u.patches ?? [])
            document.getElementById('count').textContent = Object.keys(window.seen).length
        },
        e => window.errors.push(path + ': ' + e))
}

for (let i = 0; i < n; i++) {
    const json = i % 2 === 0
    const path = json ? `/mux/j${i}` : `/mux/t${i}`
    window.paths.push(path)
    follow(path, json).catch(e => window.errors.push(path + ': ' + e))
}

// A write from the page; resolves to its status.
window.put = async (path, body) => {
    const json = path.startsWith('/mux/j')
    const res = await braid_fetch(path, {
        method: 'PUT',
        headers: { 'Content-Type': json ? 'application/json' : 'text/plain' },
        body,
    })
    return res.status
}
