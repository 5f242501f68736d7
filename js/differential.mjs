// Differential test of the server's document against Yjs itself.
//
//   node differential.mjs --url ws://127.0.0.1:PORT/ws --room R --seed S
//        [--clients 3] [--steps 150] [--timeout 60] [--expect FILE] [--out FILE] [--bmp-only 1]
//
// Session mode (default): --clients stock Yjs documents, each with its own
// y-websocket provider, make seeded random concurrent edits -- Y.Text inserts
// of ASCII, BMP, astral characters, combining marks and ZWJ sequences,
// deletes of random UTF-16 ranges (so they cut surrogate pairs), formatting;
// Y.Map sets (nested maps, arrays, plain objects); Y.Array inserts and
// deletes; Y.XmlText edits -- with random pauses and disconnects. Then every
// client reconnects, they must converge, and a fresh Yjs document built from
// the server's full state (sync step 1 with an empty state vector, answered
// by step 2) must load without error and equal every client's document.
//
// Verify mode (--expect FILE, written by a session's --out): only the fresh
// document is built and compared with the contents in FILE (after a restart).
//
// Prints one JSON line: {ok, seed, problems: [...], ...}; exits 0 either way
// unless the harness itself broke. Exits by itself after --timeout seconds.

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import * as syncProtocol from 'y-protocols/sync'
import * as encoding from 'lib0/encoding'
import * as decoding from 'lib0/decoding'
import WebSocket from 'ws'
import { readFileSync, writeFileSync } from 'node:fs'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].slice(2)] = process.argv[i + 1]
const seed = Number(args.seed ?? 1)
const nClients = Number(args.clients ?? 3)
const steps = Number(args.steps ?? 150)
const hardTimeout = setTimeout(() => {
  console.log(JSON.stringify({ ok: false, seed, problems: ['harness timeout'] }))
  process.exit(3)
}, Number(args.timeout ?? 60) * 1000)

// Errors Yjs or the provider log ("Caught error while handling a Yjs update") are failures.
const logged = []
const origError = console.error
console.error = (...a) => { logged.push(a.map(String).join(' ')); origError(...a) }

function mulberry32 (a) {
  return () => {
    a |= 0; a = (a + 0x6D2B79F5) | 0
    let t = Math.imul(a ^ (a >>> 15), 1 | a)
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}
const rand = mulberry32(seed)
const int = (n) => Math.floor(rand() * n)
const pick = (xs) => xs[int(xs.length)]
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const PIECES = [
  'a', 'xyz', 'hello ', // ASCII
  'ü', 'ß', '日本', 'Привет', 'שלום', // BMP, other scripts
  '🙂', '𝄞', '👍🏽', '🏳️‍🌈', '👩‍👩‍👧', '🇩🇪', // astral, modifiers, ZWJ sequences, flags
  'e\u0301', 'a\u0308\u0323', 'क्षि' // combining marks
]
const BMP = PIECES.filter((piece) => !/[\uD800-\uDFFF]/.test(piece))
const pool = args['bmp-only'] ? BMP : PIECES
const text = () => { let s = ''; for (let i = 1 + int(3); i > 0; i--) s += pick(pool); return s }
const value = (depth = 0) => {
  switch (int(depth > 1 ? 4 : 6)) {
    case 0: return int(1000)
    case 1: return text()
    case 2: return rand() < 0.5
    case 3: return null
    case 4: return { k: text(), n: [int(10), text()] } // a plain object
    default: return [int(5), text(), { deep: rand() < 0.5 }]
  }
}

function contents (doc) {
  const xml = doc.getXmlFragment('xml')
  return {
    notes: doc.getText('notes').toDelta(),
    meta: doc.getMap('meta').toJSON(),
    list: doc.getArray('list').toJSON(),
    xml: xml.toString()
  }
}

const isLow = (s, i) => { const c = s.charCodeAt(i); return c >= 0xDC00 && c <= 0xDFFF }

function edit (doc) {
  const t = doc.getText('notes')
  const r = rand()
  if (r < 0.3) {
    t.insert(int(t.length + 1), text(), rand() < 0.2 ? { bold: true } : undefined)
  } else if (r < 0.5) {
    if (t.length > 0) { const at = int(t.length); t.delete(at, 1 + int(Math.min(4, t.length - at))) }
  } else if (r < 0.57) {
    // Formatting ranges start and end on whole characters: a format() boundary
    // between two halves of a pair makes Yjs 13.6 clients disagree among
    // themselves, with no server involved (docs/protocol.md).
    if (t.length > 0) {
      const s = t.toString()
      let at = int(s.length)
      if (at > 0 && isLow(s, at)) at--
      let end = Math.min(s.length, at + 1 + int(4))
      if (end < s.length && isLow(s, end)) end++
      t.format(at, end - at, { italic: rand() < 0.7 ? true : null })
    }
  } else if (r < 0.72) {
    const m = doc.getMap('meta')
    const key = pick(['a', 'b', 'c', 'd'])
    const k = int(4)
    if (k === 0) { const child = new Y.Map(); child.set('v', value(1)); child.set('t', text()); m.set(key, child) } else if (k === 1) { const arr = new Y.Array(); arr.push([value(1), value(1)]); m.set(key, arr) } else if (k === 2) m.delete(key)
    else {
      const child = m.get(key)
      if (child instanceof Y.Map) child.set(pick(['x', 'y']), value(1))
      else if (child instanceof Y.Array) child.insert(int(child.length + 1), [value(1)])
      else m.set(key, value())
    }
  } else if (r < 0.85) {
    const a = doc.getArray('list')
    if (rand() < 0.6 || a.length === 0) a.insert(int(a.length + 1), [value(), text()])
    else { const at = int(a.length); a.delete(at, 1 + int(Math.min(2, a.length - at))) }
  } else {
    const frag = doc.getXmlFragment('xml')
    if (frag.length === 0) frag.insert(0, [new Y.XmlText()])
    const x = frag.get(0)
    if (x instanceof Y.XmlText) {
      if (rand() < 0.6 || x.length === 0) x.insert(int(x.length + 1), text())
      else { const at = int(x.length); x.delete(at, 1 + int(Math.min(3, x.length - at))) }
    }
  }
}

// DIFF_TRACE=FILE: every update each client sends and receives, for post-mortems.
const trace = []
function connect (doc, room) {
  const who = docs.indexOf(doc)
  class Traced extends WebSocket {
    constructor (url, protocols) {
      super(url, protocols)
      this.on('message', (data) => { if (process.env.DIFF_TRACE) trace.push({ who, dir: 'in', hex: Buffer.from(data).toString('hex') }) })
    }
  }
  if (process.env.DIFF_TRACE) doc.on('update', (u, origin) => { if (typeof origin !== 'object' || origin === null) trace.push({ who, dir: 'local', hex: Buffer.from(u).toString('hex') }) })
  return new WebsocketProvider(args.url, room, doc, { WebSocketPolyfill: Traced, disableBc: true })
}

const until = async (cond, ms, what) => {
  const end = Date.now() + ms
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

// The server's full state, as any newcomer gets it: our step 1 (empty), its step 2.
function serverState (room) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${args.url}/${room}`)
    ws.binaryType = 'arraybuffer'
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('no step 2 from server')) }, 15000)
    ws.on('open', () => {
      const enc = encoding.createEncoder()
      encoding.writeVarUint(enc, 0) // sync
      syncProtocol.writeSyncStep1(enc, new Y.Doc())
      ws.send(encoding.toUint8Array(enc))
    })
    ws.on('message', (data) => {
      const dec = decoding.createDecoder(new Uint8Array(data))
      if (decoding.readVarUint(dec) !== 0) return
      if (decoding.readVarUint(dec) !== 1) return // only step 2
      const update = decoding.readVarUint8Array(dec)
      clearTimeout(timer)
      ws.close()
      resolve(update)
    })
    ws.on('error', reject)
  })
}

async function loadServerState (room) {
  const update = await serverState(room)
  const fresh = new Y.Doc()
  Y.applyUpdate(fresh, update) // throws on a state Yjs cannot read
  return { doc: fresh, bytes: update.length }
}

// Key order of Y.Map.toJSON() and of format attributes follows each client's
// own insertion order, so compare with keys sorted.
const canonical = (v) => Array.isArray(v)
  ? v.map(canonical)
  : v !== null && typeof v === 'object' && !(v instanceof Uint8Array)
    ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]))
    : v
const same = (a, b) => JSON.stringify(canonical(a)) === JSON.stringify(canonical(b))

const docs = []
async function session () {
  const room = args.room
  const providers = []
  for (let i = 0; i < nClients; i++) {
    const doc = new Y.Doc()
    docs.push(doc)
    providers.push(connect(doc, room))
  }
  await until(() => providers.every((p) => p.synced), 15000, 'initial sync')
  for (let s = 0; s < steps; s++) {
    const i = int(nClients)
    const r = rand()
    if (r < 0.04 && providers[i].wsconnected) providers[i].disconnect()
    else if (r < 0.1 && !providers[i].shouldConnect) providers[i].connect()
    else docs[i].transact(() => { for (let n = 1 + int(2); n > 0; n--) edit(docs[i]) })
    if (rand() < 0.3) await sleep(int(15))
  }
  for (const p of providers) if (!p.shouldConnect) p.connect()
  const problems = []
  try {
    await until(() => providers.every((p) => p.synced && p.wsconnected) &&
      docs.every((d) => same(Y.encodeStateVector(d), Y.encodeStateVector(docs[0])) && same(contents(d), contents(docs[0]))),
    30000, 'clients to converge')
  } catch (e) {
    problems.push(String(e.message))
    if (process.env.DIFF_DEBUG) for (const d of docs) for (const k of Object.keys(contents(d))) if (!same(contents(d)[k], contents(docs[0])[k])) origError(k, JSON.stringify(contents(d)[k]), JSON.stringify(contents(docs[0])[k]))
  }
  if (process.env.DIFF_TRACE) writeFileSync(process.env.DIFF_TRACE, JSON.stringify({ trace, docs: docs.map((d) => Buffer.from(Y.encodeStateAsUpdate(d)).toString('hex')) }))
  const expected = contents(docs[0])
  const stateVector = Array.from(Y.encodeStateVector(docs[0]))
  for (const p of providers) p.destroy()
  const out = await compare(room, expected, stateVector, problems)
  if (args.out) writeFileSync(args.out, JSON.stringify({ expected, stateVector }))
  return out
}

async function compare (room, expected, stateVector, problems) {
  let server = null
  try {
    server = await loadServerState(room)
  } catch (e) {
    problems.push(`server state does not load in Yjs: ${e.message}`)
  }
  if (server) {
    if (!same(contents(server.doc), expected)) problems.push('server document differs from the clients\'')
    if (!same(Array.from(Y.encodeStateVector(server.doc)), stateVector)) problems.push('server state vector differs from the clients\'')
  }
  if (logged.length) problems.push(`Yjs logged errors: ${logged.slice(0, 3).join(' | ')}`)
  return {
    ok: problems.length === 0,
    seed,
    problems,
    astral: JSON.stringify(expected).match(/[\uD800-\uDBFF]/g)?.length ?? 0,
    replacement: JSON.stringify(expected).split('\uFFFD').length - 1,
    expected: problems.length ? expected : undefined,
    server: problems.length && server ? contents(server.doc) : undefined
  }
}

async function verify () {
  const { expected, stateVector } = JSON.parse(readFileSync(args.expect, 'utf8'))
  return compare(args.room, expected, stateVector, [])
}

try {
  const result = args.expect ? await verify() : await session()
  console.log(JSON.stringify(result))
  clearTimeout(hardTimeout)
  process.exit(0)
} catch (e) {
  console.log(JSON.stringify({ ok: false, seed, problems: [`harness error: ${e.stack}`] }))
  process.exit(4)
}
