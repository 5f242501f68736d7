// Unit tests of the package's pure parts (node --test). The real-server tests
// are tests/test_sdk.py and tests/test_sdk_browser.py.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import * as Y from 'yjs'
import WebSocket from 'ws'
import {
  encodeControl, decodeControlPayload, applyPresence, participantList, applyLockMessage, covers,
  createObservable, connectWorkspace, bridgeToEventBus, EVENT_NAMES, CollabError
} from '@datasource-collab/client'
import { isUpdateFrame } from '../src/control.js'
import { lockChanges } from '../src/locks.js'
import { configChanges, splitPath } from '../src/changes.js'

test('a control frame is 0x64 then msgpack, byte for byte as in docs/protocol.md', () => {
  const frame = encodeControl({ type: 'hello', protocol: 1 })
  assert.equal(Buffer.from(frame).toString('hex'), '6482a474797065a568656c6c6fa870726f746f636f6c01')
  assert.deepEqual(decodeControlPayload(frame.subarray(1)), { type: 'hello', protocol: 1 })
  assert.throws(() => encodeControl({ nope: 1 }), TypeError)
  assert.throws(() => decodeControlPayload(Uint8Array.of(0x01)), TypeError)
})

test('only sync step 2 and update frames count as updates', () => {
  assert.equal(isUpdateFrame(Uint8Array.of(0, 0, 1, 0)), false) // step 1
  assert.equal(isUpdateFrame(Uint8Array.of(0, 1, 2, 0, 0)), true) // step 2
  assert.equal(isUpdateFrame(Uint8Array.of(0, 2, 2, 0, 0).buffer), true) // update, as an ArrayBuffer
  assert.equal(isUpdateFrame(Uint8Array.of(1, 2)), false) // awareness
  assert.equal(isUpdateFrame(Uint8Array.of(100, 0x80)), false)
})

const alice = { user_id: 'alice', name: 'Alice', joined_at: 2, editing: null, locks: [] }
const bob = { user_id: 'bob', name: 'Bob', joined_at: 1, editing: null, locks: [] }

test('roster: snapshot then diffs in order; list earliest first', () => {
  let roster = applyPresence(new Map(), { type: 'presence.snapshot', participants: [alice] })
  roster = applyPresence(roster, { type: 'presence.diff', joins: [bob], leaves: [], updates: [] })
  assert.deepEqual(participantList(roster).map((p) => p.user_id), ['bob', 'alice'])
  roster = applyPresence(roster, { type: 'presence.diff', updates: [{ ...alice, editing: 'connection.host', locks: ['connection'] }] })
  assert.equal(roster.get('alice').editing, 'connection.host')
  assert.deepEqual(roster.get('alice').locks, ['connection'])
  const before = roster
  roster = applyPresence(roster, { type: 'presence.diff', leaves: [bob] })
  assert.deepEqual([...roster.keys()], ['alice'])
  assert.equal(before.size, 2, 'applying a diff never mutates the previous roster')
  assert.equal(applyPresence(roster, { type: 'saved' }), roster)
})

test('locks: broadcasts and snapshots; an end naming another lease changes nothing', () => {
  const rec = { path: 'connection', holder: 'h1', user_id: 'alice', name: 'Alice', fence: 3, expires_at: 10 }
  let locks = applyLockMessage(new Map(), { type: 'lock.acquired', ...rec })
  assert.deepEqual(locks.get('connection'), rec)
  assert.equal(applyLockMessage(locks, { type: 'lock.released', path: 'connection', holder: 'h2', fence: 3 }), locks)
  assert.equal(applyLockMessage(locks, { type: 'lock.expired', ...rec, fence: 2 }), locks)
  const after = applyLockMessage(locks, { type: 'lock.released', ...rec, reason: 'release' })
  assert.equal(after.size, 0)
  assert.deepEqual(lockChanges(locks, after), { acquired: [], released: [rec] })
  locks = applyLockMessage(after, { type: 'lock.state', you: 'h9', locks: [rec, { ...rec, path: 'name', fence: 4 }] })
  assert.deepEqual([...locks.keys()], ['connection', 'name'])
  const regranted = applyLockMessage(locks, { type: 'lock.acquired', ...rec, holder: 'h2', fence: 5 })
  const changes = lockChanges(locks, regranted)
  assert.deepEqual(changes.released.map((r) => r.fence), [3])
  assert.deepEqual(changes.acquired.map((r) => r.fence), [5])
  assert.ok(covers('connection', 'connection.host'))
  assert.ok(!covers('connection', 'connectionx'))
})

test('config changes: dotted paths with old and new values', () => {
  const doc = new Y.Doc()
  const config = doc.getMap('config')
  const seen = []
  config.observeDeep((events) => seen.push(configChanges(events)))
  doc.transact(() => {
    const connection = new Y.Map()
    config.set('connection', connection)
    connection.set('host', 'a')
  })
  config.get('connection').set('host', 'b')
  config.get('connection').delete('host')
  assert.deepEqual(seen[0], [{ path: 'connection', action: 'add', oldValue: undefined, newValue: { host: 'a' } }])
  assert.deepEqual(seen[1], [{ path: 'connection.host', action: 'update', oldValue: 'a', newValue: 'b' }])
  assert.deepEqual(seen[2], [{ path: 'connection.host', action: 'delete', oldValue: 'b', newValue: undefined }])
  assert.throws(() => splitPath('a..b'), TypeError)
  assert.throws(() => splitPath(''), TypeError)
})

test('observable: subscribe gets the value at once and each change, unsubscribe stops it', () => {
  const o = createObservable(1)
  const got = []
  const off = o.subscribe((v) => got.push(v))
  o.set(2)
  o.set(2)
  off()
  o.set(3)
  assert.deepEqual(got, [1, 2])
  assert.equal(o.get(), 3)
})

test('offline workspace: edit/get on nested maps, local changes reach the bridge, requests wait for a connection', async () => {
  const ws = connectWorkspace({ url: 'ws://127.0.0.1:9/ws', workspace: 'ds-1', WebSocketPolyfill: WebSocket, connect: false })
  const bus = []
  const off = bridgeToEventBus(ws, { emit: (name, payload) => bus.push([name, payload]) })
  ws.edit('connection.host', 'db')
  assert.equal(ws.get('connection.host'), 'db')
  assert.ok(ws.config.get('connection') instanceof Y.Map)
  assert.deepEqual(ws.get('connection'), { host: 'db' })
  assert.equal(ws.get('nothing.here'), undefined)
  ws.edit('connection.host', undefined)
  assert.deepEqual(bus.map(([name]) => name), [EVENT_NAMES.updated, EVENT_NAMES.updated])
  assert.equal(bus[0][1].local, true)
  assert.deepEqual(bus[0][1].paths, ['connection'])
  assert.deepEqual(bus[1][1].changes, [{ path: 'connection.host', action: 'delete', oldValue: 'db', newValue: undefined }])
  off()
  await assert.rejects(ws.acquireLock('connection', { timeout: 50 }), (err) => err instanceof CollabError && err.code === 'timeout')
  const pending = ws.whenSaved()
  ws.destroy()
  await assert.rejects(pending, (err) => err.code === 'closed')
  assert.equal(ws.status.get(), 'closed')
  assert.throws(() => connectWorkspace({ workspace: 'x' }), TypeError)
  assert.throws(() => bridgeToEventBus(ws, {}), TypeError)
})
