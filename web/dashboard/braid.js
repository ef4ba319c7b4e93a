// A small Braid-HTTP subscription reader for the dashboard (no dependencies).
//
// Plait's status resources answer `Subscribe: true` with `209` and a stream of update
// blocks, each a whole JSON document:
//
//   HTTP 200 OK\r\n
//   Version: "live.1733-7"\r\n
//   Parents: "live.1733-6"\r\n
//   Content-Length: 123\r\n
//   \r\n
//   {...123 bytes...}\r\n
//   \r\n
//
// So this reader only has to split blocks: read header lines up to a blank line, then
// Content-Length bytes of body. Blank lines between blocks (heartbeats) are skipped. It
// does not apply patches: a block with `Patches:` or `Content-Range:` is reported as an
// error, since status resources never send them. (web/README.md says why this is not the
// braid-http client.)
//
//   const stop = subscribe(url, {
//       headers: { Authorization: 'Bearer …' },   // or none: the owner cookie is sent
//       onVersion: (value, version) => …,         // value: the parsed JSON
//       onStatus: (state, detail) => …,           // 'open' | 'retrying' | 'refused'
//   })
//   stop()                                        // ends the subscription
//
// A dropped stream is opened again after a pause (growing to 10 s); a 401 or 403 is not
// retried ('refused'), so a page without the owner's credential shows nothing.

const CRLF = [13, 10]

function indexOfCRLF(buf, from) {
    for (let i = from; i + 1 < buf.length; i++) {
        if (buf[i] === CRLF[0] && buf[i + 1] === CRLF[1]) return i
    }
    return -1
}

function concat(a, b) {
    const out = new Uint8Array(a.length + b.length)
    out.set(a, 0)
    out.set(b, a.length)
    return out
}

// Parses as many whole blocks as `buf` holds; returns [blocks, rest].
export function parseBlocks(buf) {
    const blocks = []
    const text = new TextDecoder()
    let pos = 0
    for (;;) {
        // Skip heartbeats (blank lines) between blocks.
        while (pos + 1 < buf.length && buf[pos] === 13 && buf[pos + 1] === 10) pos += 2
        const headers = {}
        let at = pos
        let done = false
        for (;;) {
            const end = indexOfCRLF(buf, at)
            if (end < 0) break
            if (end === at) { at = end + 2; done = true; break }
            const line = text.decode(buf.subarray(at, end))
            at = end + 2
            if (line.startsWith('HTTP ')) { headers[':status'] = line.split(' ')[1]; continue }
            const colon = line.indexOf(':')
            if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim()
        }
        if (!done) break
        if (headers['patches'] || headers['content-range']) throw new Error('patch updates are not supported here')
        const length = parseInt(headers['content-length'] ?? '0', 10)
        if (!(length >= 0)) throw new Error('bad Content-Length')
        if (buf.length < at + length) break
        blocks.push({
            status: headers[':status'],
            version: headers['version'],
            parents: headers['parents'],
            body: text.decode(buf.subarray(at, at + length)),
        })
        pos = at + length
    }
    return [blocks, buf.subarray(pos)]
}

export function subscribe(url, { headers = {}, onVersion, onStatus = () => {} }) {
    const abort = new AbortController()
    let pause = 500
    const run = async () => {
        while (!abort.signal.aborted) {
            let res
            try {
                res = await fetch(url, {
                    headers: { ...headers, Subscribe: 'true', Accept: 'application/json' },
                    credentials: 'same-origin',
                    cache: 'no-store',
                    signal: abort.signal,
                })
            } catch (e) {
                if (abort.signal.aborted) return
                onStatus('retrying', String(e))
                await sleep(pause); pause = Math.min(pause * 2, 10000)
                continue
            }
            if (res.status === 401 || res.status === 403) {
                onStatus('refused', res.status + ' ' + (await res.text()))
                return
            }
            if (res.status !== 209 || !res.body) {
                onStatus('retrying', 'answered ' + res.status)
                await sleep(pause); pause = Math.min(pause * 2, 10000)
                continue
            }
            onStatus('open')
            pause = 500
            const reader = res.body.getReader()
            let buf = new Uint8Array(0)
            try {
                for (;;) {
                    const { value, done } = await reader.read()
                    if (done) break
                    buf = concat(buf, value)
                    const [blocks, rest] = parseBlocks(buf)
                    buf = rest.slice()
                    for (const b of blocks) {
                        if (b.status !== '200') continue
                        onVersion(JSON.parse(b.body), b.version)
                    }
                }
            } catch (e) {
                if (abort.signal.aborted) return
                onStatus('retrying', String(e))
            }
            if (abort.signal.aborted) return
            onStatus('retrying', 'the subscription ended')
            await sleep(pause)
        }
    }
    run()
    return () => abort.abort()
}

function sleep(ms) {
    return new Promise(r => setTimeout(r, ms))
}
