// The Plait admin dashboard: a live Braid client of the server's status resources
// (`/.well-known/plait/status/<section>`), and an editor of the access rules.
//
// Credentials: an owner session cookie (from a one-time link `plait dashboard` prints:
// `…/dashboard/#login=SECRET`, redeemed once, then removed from the address bar), or an
// owner token typed in (kept in this tab's sessionStorage, sent as a Bearer token).
// Without either the server answers 401 and the page shows only the login form.
//
// The page follows `status/all` (every section in one document) with one subscription.
//
// Everything shown is built with text nodes (never innerHTML): refusal reasons and
// resource paths come from clients.

import { subscribe } from './braid.js'

const STATUS = '/.well-known/plait/status/'
const RULES = '/.well-known/plait/access'
const $ = (id) => document.getElementById(id)

function el(tag, attrs = {}, ...children) {
    const e = document.createElement(tag)
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v)
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c ?? '')))
    return e
}

function authHeaders() {
    const token = sessionStorage.getItem('plait-token')
    return token ? { Authorization: 'Bearer ' + token } : {}
}

function bytes(n) {
    if (typeof n !== 'number') return String(n?.error ?? '—')
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
    let i = 0
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++ }
    return (i ? n.toFixed(1) : n) + ' ' + units[i]
}

function when(ms) {
    return new Date(ms).toLocaleString()
}

function dl(target, pairs) {
    const d = $(target)
    d.replaceChildren()
    for (const [k, v] of pairs) d.append(el('dt', {}, k), el('dd', {}, v))
}

function rows(table, list, cells) {
    const body = $(table).querySelector('tbody')
    body.replaceChildren(...list.map(item => el('tr', {}, ...cells(item).map(c => el('td', {}, c)))))
}

function figure(label, value) {
    return el('div', { class: 'figure' }, el('span', { class: 'value' }, value), el('span', { class: 'label' }, label))
}

// A small line graph: points [{x, y}], drawn as inline SVG.
function graph(target, points, { color = '#2a6fdb' } = {}) {
    const W = 420, H = 120, P = 24
    const ns = 'http://www.w3.org/2000/svg'
    const svg = document.createElementNS(ns, 'svg')
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`)
    svg.setAttribute('class', 'graph')
    const line = (x1, y1, x2, y2, cls) => {
        const l = document.createElementNS(ns, 'line')
        for (const [k, v] of Object.entries({ x1, y1, x2, y2, class: cls })) l.setAttribute(k, v)
        svg.append(l)
    }
    const label = (x, y, text, anchor = 'end') => {
        const t = document.createElementNS(ns, 'text')
        t.setAttribute('x', x); t.setAttribute('y', y); t.setAttribute('text-anchor', anchor)
        t.textContent = text
        svg.append(t)
    }
    line(P, H - P, W - 4, H - P, 'axis')
    line(P, 4, P, H - P, 'axis')
    if (points.length) {
        const xs = points.map(p => p.x), ys = points.map(p => p.y)
        const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1)
        const top = Math.max(1, ...ys)
        const sx = x => P + (x - x0) / (x1 - x0) * (W - P - 8)
        const sy = y => H - P - y / top * (H - P - 8)
        const poly = document.createElementNS(ns, 'polyline')
        poly.setAttribute('points', points.map(p => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(' '))
        poly.setAttribute('fill', 'none')
        poly.setAttribute('stroke', color)
        poly.setAttribute('stroke-width', '2')
        svg.append(poly)
        label(P - 3, 12, String(Math.round(top * 10) / 10))
        label(P - 3, H - P, '0')
        label(W - 4, H - 6, 'now', 'end')
        label(P, H - 6, `-${Math.round((x1 - x0) / 1000)} s`, 'start')
    }
    $(target).replaceChildren(svg)
}

const render = {
    overview(v) {
        const started = Date.now() - v.started_ms
        dl('overview', [
            ['Identity', v.id],
            ['Version', 'plait ' + v.version],
            ['Store', v.store],
            ['Up since', when(v.started_ms) + ` (${Math.round(started / 60000)} min)`],
            ['Public URL', v.public_url ?? '(the listen address)'],
            ['Resident memory', v.rss_mib == null ? '—' : v.rss_mib + ' MiB'],
            ['Invite links', v.invite ? v.invite.command + (v.invite.networks.length ? ` (networks: ${v.invite.networks.join(', ')})` : '') : 'the p2p node is off'],
        ])
        $('who').textContent = v.id.slice(0, 12) + '…'
        $('invite-form').hidden = !v.invite
    },
    live(v) {
        const f = v.figures
        $('figures').replaceChildren(
            figure('connections', f.connections),
            figure('subscriptions', v.client_subscriptions),
            figure('Braid streams', f.braid_subscriptions),
            figure('Statebus subscriptions', f.statebus_subscriptions),
            figure('deliveries', f.braid_deliveries + f.statebus_deliveries),
            figure('resources in memory', v.resources_in_memory),
        )
        const h = v.history
        graph('graph-subscriptions', h.map(s => ({ x: s.t, y: s.subscriptions })))
        const rate = []
        for (let i = 1; i < h.length; i++) {
            const dt = (h[i].t - h[i - 1].t) / 1000
            if (dt > 0) rate.push({ x: h[i].t, y: (h[i].deliveries - h[i - 1].deliveries) / dt })
        }
        graph('graph-deliveries', rate, { color: '#d9822b' })
        rows('resources', v.resources, r => [r.path, r.subscriptions])
    },
    storage(v) {
        dl('storage', [
            ['Backend', v.backend],
            ['Stored', bytes(v.stored_bytes)],
            ["The instance's namespace", bytes(v.instance_namespace_bytes)],
            ['Quota per namespace', v.max_stored_bytes_per_namespace ? bytes(v.max_stored_bytes_per_namespace) : 'none'],
            ['Quota per identity', v.max_stored_bytes_per_identity ? bytes(v.max_stored_bytes_per_identity) : 'none'],
            ...(v.pool ? [['Postgres pool', `${v.pool.size}/${v.pool.max_size} open, ${v.pool.available} idle, ${v.pool.waiting} waiting`]] : []),
        ])
    },
    network(v) {
        const out = $('network')
        if (!v.enabled) { out.replaceChildren(el('p', {}, 'The p2p node is off.')); return }
        const s = v.status
        const parts = [el('p', {}, `Peer ${s.peer_id}: ${s.members} members, ${s.connected?.length ?? 0} connected, ${s.connected_peers ?? 0} libp2p connections.`)]
        for (const d of Array.isArray(v.members) ? v.members : []) {
            parts.push(el('h3', {}, 'Network ' + (d.dht ?? '')))
            const list = el('ul')
            for (const m of d.members ?? []) {
                list.append(el('li', {}, `${m.id ?? m.identity ?? JSON.stringify(m)}${m.connected ? ' — connected' + (m.relayed ? ' (relayed)' : '') : ''}`))
            }
            parts.push(list)
        }
        if (v.members?.error) parts.push(el('p', { class: 'error' }, v.members.error))
        out.replaceChildren(...parts)
    },
    mirrors(v) {
        const out = $('mirrors')
        const mirrors = Object.entries(v.mirrors ?? {})
        const grants = Object.entries(v.grants ?? {})
        const used = v.running?.used ?? {}
        const pushed = v.running?.mirrors ?? {}
        out.replaceChildren(
            el('h3', {}, 'This server pushes to'),
            mirrors.length ? el('ul', {}, ...mirrors.map(([id, m]) => el('li', {}, `${id} (network ${m.dht})` + (pushed[id] ? ` — acknowledged ${pushed[id].acked ?? 0} of ${v.running.sealed_seq}` : '')))) : el('p', {}, 'no mirrors'),
            el('h3', {}, 'This server keeps segments for'),
            grants.length ? el('ul', {}, ...grants.map(([id, g]) => el('li', {}, `${id}: ${bytes(used[id] ?? 0)} of ${bytes(g.quota)}`))) : el('p', {}, 'no grants'),
        )
    },
    tokens(v) {
        if (v.error) { rows('tokens', [], () => []); return }
        rows('tokens', v.tokens, t => [
            t.id, t.label ?? '',
            t.owner ? 'owner' : [...t.read.map(p => 'read ' + p), ...t.write.map(p => 'write ' + p)].join(', '),
            t.expires_secs ? when(t.expires_secs * 1000) : 'never',
        ])
    },
    refusals(v) {
        $('refusal-counts').replaceChildren(...Object.entries(v.counts).map(([code, n]) => figure(code, n)))
        rows('refusals', [...v.recent].reverse(), r => [when(r.at_ms), r.code, r.what, r.client ?? '', r.reason])
    },
}

async function loadRules() {
    const res = await fetch(RULES, { headers: { ...authHeaders(), Accept: 'application/json' }, cache: 'no-store' })
    if (!res.ok) { $('rules-status').textContent = 'could not read the rules: ' + res.status; return }
    $('rules').value = JSON.stringify(await res.json(), null, 2)
    $('rules-status').textContent = ''
}

async function saveRules() {
    let doc
    try { doc = JSON.parse($('rules').value) } catch (e) { $('rules-status').textContent = 'not JSON: ' + e.message; return }
    $('rules-status').textContent = 'saving…'
    const res = await fetch(RULES, {
        method: 'PUT',
        headers: { ...authHeaders(), 'Content-Type': 'application/json' },
        body: JSON.stringify(doc),
    })
    $('rules-status').textContent = res.ok ? 'saved' : `refused (${res.status}): ${await res.text()}`
}

let stops = []

function start() {
    $('login').hidden = true
    $('main').hidden = false
    $('logout').hidden = false
    // One subscription for every section: a page over HTTP/1.1 has six connections to
    // this origin, and each open subscription holds one.
    stops.push(subscribe(STATUS + 'all', {
        headers: authHeaders(),
        onVersion: (all) => {
            for (const [section, draw] of Object.entries(render)) {
                if (all[section] === undefined) continue
                try { draw(all[section]) } catch (e) { console.warn(section, e) }
            }
        },
        onStatus: (state, detail) => {
            if (state === 'refused') { showLogin('Not logged in: ' + (detail ?? '')); return }
            $('conn').textContent = state === 'open' ? 'live' : state
            $('conn').className = 'pill ' + state
        },
    }))
    loadRules()
}

function showLogin(message) {
    for (const s of stops) s()
    stops = []
    $('main').hidden = true
    $('logout').hidden = true
    $('login').hidden = false
    $('login-error').textContent = message ?? ''
    $('conn').textContent = 'not connected'
    $('conn').className = 'pill'
}

async function init() {
    $('token-form').addEventListener('submit', (e) => {
        e.preventDefault()
        sessionStorage.setItem('plait-token', $('token').value.trim())
        $('token').value = ''
        check()
    })
    $('rules-save').addEventListener('click', saveRules)
    $('invite-form').addEventListener('submit', async (e) => {
        e.preventDefault()
        const res = await fetch('invite', {
            method: 'POST',
            headers: { ...authHeaders(), 'Content-Type': 'application/json' },
            body: JSON.stringify({ uses: Number($('invite-uses').value) || 1, ttl_secs: 7 * 24 * 3600 }),
        })
        $('invite-link').textContent = res.ok ? (await res.json()).link : `refused (${res.status}): ${await res.text()}`
    })
    $('rules-reload').addEventListener('click', loadRules)
    $('logout').addEventListener('click', async () => {
        sessionStorage.removeItem('plait-token')
        await fetch('logout', { method: 'POST' })
        showLogin('Logged out.')
    })
    const m = location.hash.match(/login=([A-Za-z0-9_-]+)/)
    if (m) {
        // The link works once: take it out of the address bar and history first.
        history.replaceState(null, '', location.pathname)
        const res = await fetch('login', { method: 'POST', body: m[1] })
        if (!res.ok) { showLogin('That login link is used, expired or unknown (' + res.status + ').'); return }
    }
    check()
}

async function check() {
    const res = await fetch(STATUS + 'overview', { headers: authHeaders(), cache: 'no-store' })
    if (res.ok) start()
    else {
        if (sessionStorage.getItem('plait-token')) sessionStorage.removeItem('plait-token')
        showLogin(res.status === 401 || res.status === 403 ? '' : 'The server answered ' + res.status)
    }
}

init()
