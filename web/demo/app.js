// A small microblog on Plait, written as an app developer would write one for Braid: a
// static page, the braid-http client from npm, and state kept as JSON resources.
//
// State (each instance's own namespace; everyone reads it, only its owner writes it):
//   /posts      {"name": "Ann", "posts": {"<post id>": {"text", "at", "reply_to"?}}}
//   /following  {"following": {"<instance id>": true}}
// A reply is a post of the replier's, with "reply_to": {"author": <id>, "post": <post id>}.
//
// Following someone on another instance of the same Plait network subscribes to
// /~<their id>/posts on this server, which follows their instance live through
// federation. Writing needs this instance's owner token (`plait token`), given once in
// the login form or as #token=… in the URL (the run script prints such URLs), and kept
// in localStorage.
'use strict'

const TOKEN_KEY = 'plait-demo-token'
const JSON_ACCEPT = { Accept: 'application/json' }

let token = null
let me = null                 // this instance's id
const authors = new Map()     // id → {name, posts} as last received
const subscriptions = new Map() // id → AbortController
let following = null          // {"<id>": true}, null while /following does not exist
let openReply = null          // {key, text} of a reply form being typed in

const $ = id => document.getElementById(id)
const status = text => { $('status').textContent = text || '' }
const postsPath = id => (id === me ? '/posts' : `/~${id}/posts`)
const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8)
const nameOf = id => (authors.get(id)?.name || id.slice(0, 8)) + (id === me ? ' (you)' : '')

// A body as JSON; an empty body (a resource that does not exist yet) is null.
function parse (text) {
    if (!text) return null
    try { return JSON.parse(text) } catch (e) { return null }
}

// Follows a resource live: `onValue` gets each new value (null while it does not exist).
function follow (path, onValue) {
    const ac = new AbortController()
    braid_fetch(path, { subscribe: true, retry: true, signal: ac.signal, headers: JSON_ACCEPT })
        .then(res => res.subscribe(
            update => onValue(parse(update.body_text)),
            err => { if (!ac.signal.aborted) status(`lost ${path}: ${err}`) }))
        .catch(err => { if (!ac.signal.aborted) status(`cannot follow ${path}: ${err}`) })
    return ac
}

// Sets one field of one of this instance's JSON documents, as the owner. An existing
// document gets a JSON range patch, so concurrent writes (two tabs) merge; a missing one
// is created whole from `base`.
async function setField (path, current, base, steps, value) {
    const headers = { 'Content-Type': 'application/json', Authorization: 'Bearer ' + token }
    let req
    if (current) {
        const range = steps.map(s => '.' + s).join('')
        req = { method: 'PUT', headers, patches: [{ unit: 'json', range, content: JSON.stringify(value) }] }
    } else {
        const whole = JSON.parse(JSON.stringify(base))
        let o = whole
        for (const s of steps.slice(0, -1)) o = (o[s] = o[s] || {})
        o[steps[steps.length - 1]] = value
        req = { method: 'PUT', headers, body: JSON.stringify(whole) }
    }
    const res = await braid_fetch(path, req)
    if (res.status === 401 || res.status === 403) {
        logout()
        throw new Error('that token may not write here; log in with this instance\'s owner token')
    }
    if (!res.ok) throw new Error(`${path} answered ${res.status}: ${await res.text()}`)
}

const myPosts = () => authors.get(me) || null
const POSTS_BASE = { name: '', posts: {} }

async function publish (post) {
    await setField('/posts', myPosts(), POSTS_BASE, ['posts', newId()], post)
}

// --- who is followed ------------------------------------------------------------------

function followAuthor (id) {
    if (subscriptions.has(id)) return
    subscriptions.set(id, follow(postsPath(id), value => {
        if (value) authors.set(id, value)
        else authors.delete(id)
        if (id === me && document.activeElement !== $('name')) $('name').value = value?.name || ''
        render()
    }))
}

function unfollowAuthor (id) {
    subscriptions.get(id)?.abort()
    subscriptions.delete(id)
    authors.delete(id)
}

function followedChanged (value) {
    following = value?.following || null
    const want = new Set([me, ...Object.keys(following || {}).filter(id => following[id])])
    for (const id of [...subscriptions.keys()]) if (!want.has(id)) unfollowAuthor(id)
    for (const id of want) followAuthor(id)
    render()
}

// --- the timeline ---------------------------------------------------------------------

function allPosts () {
    const posts = []
    for (const [author, doc] of authors)
        for (const [id, p] of Object.entries(doc.posts || {}))
            if (p && typeof p.text === 'string') posts.push({ ...p, author, id, key: author + '/' + id })
    return posts
}

function render () {
    const followed = Object.keys(following || {}).filter(id => following[id] && id !== me)
    $('following').replaceChildren(...followed.map(id => {
        const li = document.createElement('li')
        li.textContent = 'Following ' + nameOf(id) + ' · ' + id
        li.dataset.id = id
        return li
    }))
    // Keep a reply being typed across re-renders.
    const typing = document.activeElement?.classList.contains('reply-text')
    const posts = allPosts()
    const byKey = new Map(posts.map(p => [p.key, p]))
    const replies = new Map()
    const top = []
    for (const p of posts) {
        const to = p.reply_to && `${p.reply_to.author}/${p.reply_to.post}`
        if (to && byKey.has(to)) {
            if (!replies.has(to)) replies.set(to, [])
            replies.get(to).push(p)
        } else top.push(p)
    }
    const view = p => {
        const el = $('post-template').content.firstElementChild.cloneNode(true)
        el.dataset.author = p.author
        el.dataset.id = p.id
        el.classList.toggle('mine', p.author === me)
        el.querySelector('.author').textContent = nameOf(p.author)
        el.querySelector('.at').textContent = new Date(p.at).toLocaleString()
        el.querySelector('.text').textContent = p.text
        if (p.reply_to && !byKey.has(`${p.reply_to.author}/${p.reply_to.post}`))
            el.querySelector('.at').textContent += ' · a reply to ' + nameOf(p.reply_to.author)
        const button = el.querySelector(':scope > .reply')
        const form = el.querySelector(':scope > .reply-form')
        const input = form.querySelector('.reply-text')
        button.hidden = !token
        button.onclick = () => { form.hidden = false; openReply = { key: p.key, text: '' }; input.focus() }
        input.oninput = () => { openReply = { key: p.key, text: input.value } }
        form.onsubmit = e => {
            e.preventDefault()
            const text = input.value.trim()
            if (!text) return
            openReply = null
            publish({ text, at: Date.now(), reply_to: { author: p.author, post: p.id } })
                .then(() => status(''), err => status(err.message))
        }
        if (openReply?.key === p.key) {
            form.hidden = false
            input.value = openReply.text
        }
        const nested = (replies.get(p.key) || []).sort((a, b) => a.at - b.at)
        el.querySelector('.replies').replaceChildren(...nested.map(view))
        return el
    }
    top.sort((a, b) => b.at - a.at)
    $('timeline').replaceChildren(...top.map(view))
    if (typing && openReply) {
        const el = document.querySelector(`.post[data-author="${openReply.key.split('/')[0]}"][data-id="${openReply.key.split('/')[1]}"] .reply-text`)
        el?.focus()
    }
}

// --- the owner ------------------------------------------------------------------------

function login (t) {
    token = t
    localStorage.setItem(TOKEN_KEY, t)
    $('login').hidden = true
    $('owner').hidden = false
    render()
}

function logout () {
    token = null
    localStorage.removeItem(TOKEN_KEY)
    $('login').hidden = false
    $('owner').hidden = true
    render()
}

function wireForms () {
    $('login-form').onsubmit = e => {
        e.preventDefault()
        login($('token').value.trim())
        $('token').value = ''
    }
    $('logout').onclick = logout
    $('name-form').onsubmit = e => {
        e.preventDefault()
        setField('/posts', myPosts(), POSTS_BASE, ['name'], $('name').value.trim())
            .then(() => status(''), err => status(err.message))
    }
    $('compose-form').onsubmit = e => {
        e.preventDefault()
        const text = $('compose').value.trim()
        if (!text) return
        publish({ text, at: Date.now() })
            .then(() => { $('compose').value = ''; status('') }, err => status(err.message))
    }
    $('follow-form').onsubmit = e => {
        e.preventDefault()
        const id = $('follow-id').value.trim()
        if (!/^[a-z0-9]{52}$/.test(id)) return status('an instance id is 52 characters of a-z and 0-9')
        if (id === me) return status('that is this instance')
        setField('/following', following, { following: {} }, ['following', id], true)
            .then(() => { $('follow-id').value = ''; status('') }, err => status(err.message))
    }
}

async function main () {
    wireForms()
    // A token handed over in the URL's fragment (never sent to the server) logs in once.
    const fromUrl = new URLSearchParams(location.hash.slice(1)).get('token')
    if (fromUrl) history.replaceState(null, '', location.pathname + location.search)
    const saved = fromUrl || localStorage.getItem(TOKEN_KEY)
    if (saved) login(saved)
    else logout()
    me = (await (await fetch('/.well-known/plait', { headers: JSON_ACCEPT })).json()).id
    $('me-id').textContent = me
    // One subscription per followed author and one for /following: braid-http 1.3 opens
    // a connection for each, and a browser keeps six per origin.
    follow('/following', followedChanged)
    followAuthor(me)
}

main().catch(err => status('cannot start: ' + err.message))
