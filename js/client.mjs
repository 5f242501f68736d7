// A scripted stock Yjs client (yjs + y-websocket WebsocketProvider) for tests.
//
//   node client.mjs --url ws://127.0.0.1:PORT/ws --room ds-1 [--timeout 60] [--label a]
//
// Commands arrive as JSON lines on stdin; events leave as JSON lines on stdout.
// Every command may carry an "id", echoed in {"event":"ack","id":...} once the
// command was applied locally (sending to the server is the provider's job).
//
// Commands:
//   {"cmd":"set","map":"config","key":"k","value":v}      Y.Map set
//   {"cmd":"delete","map":"config","key":"k"}              Y.Map delete
//     (set/delete take an optional "path":["connection"] of nested Y.Map keys under the map;
//      "ymap":true with an object value sets a nested Y.Map instead of a plain JSON value)
//   {"cmd":"text_insert","text":"text","index":0,"content":"abc"}
//   {"cmd":"text_delete","text":"text","index":0,"length":2}
//   {"cmd":"transact","ops":[{...set/delete/text_* command...}, ...]}  one transaction
//   {"cmd":"awareness","state":{...}|null}                 setLocalState
//   {"cmd":"awareness_field","field":"f","value":v}       setLocalStateField
//   {"cmd":"dump","maps":["config"],"texts":["text"]}      -> {"event":"dump",...,"types":{key: "Y.Map"|"Y.Array"|"array"|...}}
//   {"cmd":"stats"}                                         -> {"event":"stats",...}
//   {"cmd":"disconnect"} / {"cmd":"connect"}               provider.disconnect()/connect()
//   {"cmd":"close"}   destroy the provider (clean close: awareness null, then close frame), exit 0
//
// Events:
//   {"event":"ready","clientID":n,"room":...}
//   {"event":"status","status":"connecting"|"connected"|"disconnected"}
//   {"event":"synced","synced":true, ...doc contents}   (each time the provider becomes synced)
//   {"event":"doc", ...doc contents, "remote":bool}     after every document update
//   {"event":"awareness","states":{clientID: state}}    whenever awareness changes (self included)
//   {"event":"frame_unknown","type":t,"length":n,"hex":"..."}  a frame with a type the client has no handler for
//   {"event":"connection-close","code":c,"reason":r}   server closed a connection (null code: closed locally)
//   {"event":"ack","id":...,"cmd":...} / {"event":"error","message":...,"id":...}
//   {"event":"closed","reason":"close"|"stdin-eof"|"timeout"}   last line before exiting
//
// The process exits by itself when stdin closes or after --timeout seconds, so it
// never outlives the test that started it.

import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'
import { createInterface } from 'node:readline'

const args = {}
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i]
  if (a.startsWith('--')) {
    const next = process.argv[i + 1]
    if (next === undefined || next.startsWith('--')) {
      args[a.slice(2)] = true
    } else {
      args[a.slice(2)] = next
      i++
    }
  }
}
if (!args.url || !args.room) {
  process.stderr.write('usage: node client.mjs --url ws://host:port/ws --room NAME [--timeout 60]\n')
  process.exit(2)
}
const hardTimeoutMs = Number(args.timeout ?? 60) * 1000
const label = args.label ?? ''

// JSON that survives bigints and Uint8Arrays (Yjs can hold both).
const replacer = (_key, value) => {
  if (typeof value === 'bigint') return { $bigint: value.toString() }
  if (value instanceof Uint8Array) return { $bytes: Buffer.from(value).toString('base64') }
  return value
}
const emit = (obj) => {
  process.stdout.write(JSON.stringify(label ? { ...obj, label } : obj, replacer) + '\n')
}

const KNOWN_TYPES = new Set([0, 1, 2, 3]) // sync, awareness, auth, query awareness
const frameCounts = {} // message type -> frames received
let framesReceived = 0
let unknownFrames = 0
const sockets = new Set()

// The stock ws class, plus a listener that sees every frame the provider sees.
class ObservedWebSocket extends WebSocket {
  constructor (url, protocols) {
    super(url, protocols)
    sockets.add(this)
    this.on('close', () => sockets.delete(this))
    this.on('message', (data, isBinary) => {
      framesReceived++
      const bytes = toBytes(data)
      if (!isBinary || bytes.length === 0) {
        unknownFrames++
        emit({ event: 'frame_unknown', type: null, binary: isBinary, length: bytes.length })
        return
      }
      // The message type is a lib0 varUint; every type we know fits in one byte.
      let type = 0
      let shift = 0
      for (let i = 0; i < Math.min(bytes.length, 8); i++) {
        type += (bytes[i] & 0x7f) * 2 ** shift
        if (bytes[i] < 0x80) break
        shift += 7
      }
      frameCounts[type] = (frameCounts[type] ?? 0) + 1
      if (!KNOWN_TYPES.has(type) || bytes[0] === 100) {
        unknownFrames++
        emit({
          event: 'frame_unknown',
          type,
          first_byte: bytes[0],
          length: bytes.length,
          hex: Buffer.from(bytes.subarray(0, 64)).toString('hex')
        })
      }
    })
  }
}

function toBytes (data) {
  if (data instanceof ArrayBuffer) return new Uint8Array(data)
  if (Array.isArray(data)) return new Uint8Array(Buffer.concat(data))
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  return new Uint8Array(Buffer.from(String(data)))
}

const doc = new Y.Doc()
const provider = new WebsocketProvider(args.url, args.room, doc, {
  WebSocketPolyfill: ObservedWebSocket,
  disableBc: true, // Node has a global BroadcastChannel: clients must only meet through the server
  connect: args['no-connect'] !== true
})
const awareness = provider.awareness

const contents = (maps = ['config'], texts = ['text']) => {
  const out = {}
  for (const name of maps) out[name === 'config' ? 'config' : `map:${name}`] = doc.getMap(name).toJSON()
  for (const name of texts) out[name === 'text' ? 'text' : `text:${name}`] = doc.getText(name).toString()
  return out
}

// The Yjs type of each value of a map (a plain JSON value vs a shared type matters to apps).
const typesOf = (ymap) => {
  const out = {}
  for (const [key, value] of ymap.entries()) {
    out[key] = value instanceof Y.Map ? 'Y.Map' : value instanceof Y.Array ? 'Y.Array' : value instanceof Y.Text ? 'Y.Text' : Array.isArray(value) ? 'array' : value === null ? 'null' : typeof value
  }
  return out
}

const awarenessStates = () => {
  const states = {}
  for (const [clientID, state] of awareness.getStates()) states[clientID] = state
  return states
}

emit({ event: 'ready', clientID: doc.clientID, room: args.room, url: provider.url })

provider.on('status', ({ status }) => emit({ event: 'status', status }))
provider.on('sync', (synced) => {
  if (synced) emit({ event: 'synced', synced: true, ...contents() })
})
provider.on('connection-close', (event) => {
  emit({ event: 'connection-close', code: event ? event.code : null, reason: event ? String(event.reason ?? '') : null })
})
provider.on('connection-error', (event) => {
  emit({ event: 'connection-error', message: String(event?.message ?? event?.error ?? 'error') })
})
doc.on('update', (_update, origin) => {
  emit({ event: 'doc', remote: origin === provider, ...contents() })
})
awareness.on('change', () => emit({ event: 'awareness', states: awarenessStates() }))

// The Y.Map at op.map (default "config"), then down op.path (nested Y.Map keys).
const targetMap = (op) => {
  let map = doc.getMap(op.map ?? 'config')
  for (const key of op.path ?? []) {
    const child = map.get(key)
    if (!(child instanceof Y.Map)) throw new Error(`no nested Y.Map at ${key}`)
    map = child
  }
  return map
}

const toYMap = (value) => {
  const map = new Y.Map()
  for (const [k, v] of Object.entries(value)) {
    map.set(k, v !== null && typeof v === 'object' && !Array.isArray(v) ? toYMap(v) : v)
  }
  return map
}

const applyOp = (op) => {
  switch (op.cmd) {
    case 'set':
      targetMap(op).set(op.key, op.ymap ? toYMap(op.value) : op.value)
      break
    case 'delete':
      targetMap(op).delete(op.key)
      break
    case 'text_insert':
      doc.getText(op.text ?? 'text').insert(op.index ?? 0, op.content)
      break
    case 'text_delete':
      doc.getText(op.text ?? 'text').delete(op.index ?? 0, op.length ?? 1)
      break
    default:
      throw new Error(`unknown edit ${op.cmd}`)
  }
}

let exiting = false
const finish = async (reason, code = 0) => {
  if (exiting) return
  exiting = true
  // destroy() sends our awareness as null and then closes the socket (a clean close).
  provider.destroy()
  const pending = [...sockets].map((ws) => new Promise((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) return resolve()
    ws.once('close', resolve)
  }))
  await Promise.race([Promise.all(pending), new Promise((resolve) => setTimeout(resolve, 2000))])
  emit({ event: 'closed', reason })
  process.stdout.write('', () => process.exit(code))
}

const handle = async (msg) => {
  switch (msg.cmd) {
    case 'set':
    case 'delete':
    case 'text_insert':
    case 'text_delete':
      applyOp(msg)
      break
    case 'transact':
      doc.transact(() => { for (const op of msg.ops) applyOp(op) })
      break
    case 'awareness':
      awareness.setLocalState(msg.state)
      break
    case 'awareness_field':
      awareness.setLocalStateField(msg.field, msg.value)
      break
    case 'dump':
      emit({ event: 'dump', id: msg.id, synced: provider.synced, ...contents(msg.maps, msg.texts), awareness: awarenessStates(), types: typesOf(doc.getMap('config')) })
      break
    case 'stats':
      emit({
        event: 'stats',
        id: msg.id,
        frames: framesReceived,
        by_type: frameCounts,
        unknown: unknownFrames,
        synced: provider.synced,
        connected: provider.wsconnected
      })
      break
    case 'disconnect':
      provider.disconnect()
      break
    case 'connect':
      provider.connect()
      break
    case 'close':
      emit({ event: 'ack', id: msg.id, cmd: msg.cmd })
      await finish('close')
      return
    default:
      throw new Error(`unknown command ${msg.cmd}`)
  }
  emit({ event: 'ack', id: msg.id, cmd: msg.cmd })
}

const rl = createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  if (!line.trim()) return
  let msg
  try {
    msg = JSON.parse(line)
  } catch (err) {
    emit({ event: 'error', message: `bad JSON: ${err.message}` })
    return
  }
  try {
    await handle(msg)
  } catch (err) {
    emit({ event: 'error', id: msg.id, cmd: msg.cmd, message: String(err?.stack ?? err) })
  }
})
rl.on('close', () => finish('stdin-eof'))

setTimeout(() => {
  emit({ event: 'error', message: `hard timeout after ${hardTimeoutMs} ms` })
  finish('timeout', 3)
  setTimeout(() => process.exit(3), 3000).unref() // even if the clean close hangs
}, hardTimeoutMs)
process.on('uncaughtException', (err) => {
  emit({ event: 'error', message: `uncaught: ${err?.stack ?? err}` })
  process.exit(4)
})
