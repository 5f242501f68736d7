// connectWorkspace(): the stock y-websocket WebsocketProvider, opted in to the
// server's control channel (type 100) for locks, roster, save acknowledgements
// and token refresh. The provider still does all the syncing; this only adds a
// message handler, a send counter and requests on the same socket.
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import { MESSAGE_CONTROL, PROTOCOL_VERSION, encodeControl, decodeControlPayload, isUpdateFrame } from './control.js'
import { createObservable, readonly } from './observable.js'
import { Emitter } from './emitter.js'
import { applyPresence, participantList, rosterChanges } from './roster.js'
import { LOCK_BROADCASTS, applyLockMessage, lockChanges } from './locks.js'
import { configChanges, splitPath } from './changes.js'

/** Error of a control request: `code` is the server's code (or conflict, disconnected, timeout, closed). */
export class CollabError extends Error {
  constructor (code, message, details = {}) {
    super(message || code)
    this.name = 'CollabError'
    this.code = code
    this.details = details
  }
}

// Which answers settle which request (anything else with the id is ignored).
const ANSWERS = {
  'lock.acquire': { ok: ['lock.granted'], fail: ['lock.conflict', 'lock.error'] },
  'lock.release': { ok: ['lock.release.ok'], fail: ['lock.error'] },
  'lock.force_release': { ok: ['lock.release.ok'], fail: ['lock.error'] },
  'lock.list': { ok: ['lock.state'], fail: [] },
  auth: { ok: ['auth.ok'], fail: [] },
  ping: { ok: ['pong'], fail: [] },
  'presence.get': { ok: ['presence.snapshot'], fail: [] },
  'forward.status': { ok: ['forward.status'], fail: [] }
}

const MAX_AUTH_RETRIES = 3

/**
 * Connect to one workspace. Returns at once; the connection opens in the
 * background (after `getToken()` resolves, when given).
 */
export function connectWorkspace (options) {
  const {
    url,
    workspace,
    token,
    getToken,
    doc: givenDoc,
    WebSocketPolyfill = globalThis.WebSocket,
    params = {},
    disableBc = true,
    connect = true,
    maxBackoffTime = 2500,
    requestTimeout = 15000
  } = options ?? {}
  if (typeof url !== 'string' || !url) throw new TypeError('connectWorkspace: `url` (ws://host:port/ws) is required')
  if (typeof workspace !== 'string' || !workspace) throw new TypeError('connectWorkspace: `workspace` is required')
  if (typeof WebSocketPolyfill !== 'function') {
    throw new TypeError('connectWorkspace: no WebSocket here; pass `WebSocketPolyfill` (in Node: the `ws` package)')
  }

  const doc = givenDoc ?? new Y.Doc()
  const events = new Emitter()
  const status = createObservable('connecting')
  const synced = createObservable(false)
  const participants = createObservable([])
  const locks = createObservable([], () => false)
  const user = createObservable(params.user ? { id: String(params.user), name: params.name ?? null, role: params.role ?? null } : null)
  let roster = new Map()
  let lockMap = new Map()
  let you = null // this connection's holder id (lock.state / lock.granted)
  let welcome = null
  let destroyed = false
  let authFailures = 0
  let currentToken = token ?? null

  // Outgoing update-bearing frames per socket: the server acknowledges them by count.
  const sentUpdates = new WeakMap()
  const onSend = (socket, data) => {
    if (isUpdateFrame(data)) sentUpdates.set(socket, (sentUpdates.get(socket) ?? 0) + 1)
  }
  class CountingWebSocket extends WebSocketPolyfill {
    send (data) {
      onSend(this, data)
      return super.send(data)
    }
  }

  const provider = new WebsocketProvider(url, workspace, doc, {
    connect: false,
    WebSocketPolyfill: CountingWebSocket,
    params: { ...params, ...(currentToken ? { token: currentToken } : {}) },
    disableBc,
    maxBackoffTime
  })
  const config = doc.getMap('config')

  // ------------------------------------------------------------ control requests
  let nextId = 1
  const pending = new Map() // id -> {resolve, reject, ok, fail, socket, timer, message}
  let queue = [] // requests waiting for this connection's welcome
  let acked = 0 // latest saved.updates on the current socket
  let savedSeq = null
  const saveWaiters = [] // {socket, target, resolve, reject, timer}

  const sendFrame = (message) => {
    const ws = provider.ws
    if (!ws || ws.readyState !== 1) return false
    ws.send(encodeControl(message))
    return true
  }

  const dispatch = (entry) => {
    entry.socket = provider.ws
    if (!sendFrame(entry.message)) {
      entry.socket = null
      queue.push(entry)
    }
  }

  /** Send a control request; settles with its answer (see ANSWERS). */
  const request = (message, { timeout = requestTimeout } = {}) => new Promise((resolve, reject) => {
    if (destroyed) return reject(new CollabError('closed', 'the workspace connection was destroyed'))
    const id = nextId++
    const kinds = ANSWERS[message.type] ?? { ok: [message.type], fail: [] }
    const entry = { id, message: { ...message, id }, resolve, reject, ok: kinds.ok, fail: kinds.fail, socket: null, timer: null }
    if (timeout > 0) {
      entry.timer = setTimeout(() => {
        pending.delete(id)
        queue = queue.filter((e) => e !== entry)
        reject(new CollabError('timeout', `no answer to ${message.type} within ${timeout} ms`))
      }, timeout)
    }
    pending.set(id, entry)
    if (welcome && provider.ws) dispatch(entry)
    else queue.push(entry)
  })

  const settle = (message) => {
    const entry = pending.get(message.id)
    if (!entry) return
    let error = null
    if (entry.fail.includes(message.type) || message.type === 'error') {
      const code = message.type === 'lock.conflict' ? 'conflict' : (message.code ?? message.type)
      error = new CollabError(code, message.message ?? `${entry.message.type}: ${code}`, message)
    } else if (!entry.ok.includes(message.type)) {
      return
    }
    pending.delete(message.id)
    clearTimeout(entry.timer)
    if (error) entry.reject(error)
    else entry.resolve(message)
  }

  // ------------------------------------------------------------ locks
  const publishLocks = (next, reason) => {
    if (next === lockMap) return
    const { acquired, released } = lockChanges(lockMap, next)
    lockMap = next
    locks.set([...lockMap.values()].map((r) => ({ ...r, mine: you !== null && r.holder === you })).sort((a, b) => a.path.localeCompare(b.path)))
    if (acquired.length || released.length) {
      const mark = (r) => ({ ...r, mine: you !== null && r.holder === you })
      events.emit('locks', { acquired: acquired.map(mark), released: released.map(mark), reason })
    }
    scheduleKeepalive()
  }

  // A holder must send something at least once per TTL (docs/locks.md): ping every TTL/3.
  let keepaliveTimer = null
  let myTtl = 30
  const scheduleKeepalive = () => {
    const holding = [...lockMap.values()].some((r) => r.holder === you)
    if (holding && !keepaliveTimer) {
      keepaliveTimer = setInterval(() => { if (welcome) sendFrame({ type: 'ping' }) }, Math.max(250, (myTtl * 1000) / 3))
    } else if (!holding && keepaliveTimer) {
      clearInterval(keepaliveTimer)
      keepaliveTimer = null
    }
  }

  const acquireLock = async (path, { wait, ttl, timeout } = {}) => {
    splitPath(path)
    const message = { type: 'lock.acquire', path }
    if (wait !== undefined) message.wait = wait
    if (ttl !== undefined) message.ttl = ttl
    const grant = await request(message, { timeout: timeout ?? requestTimeout + (wait ?? 0) * 1000 })
    you = grant.holder
    if (typeof grant.ttl === 'number') {
      if (grant.ttl < myTtl && keepaliveTimer) { clearInterval(keepaliveTimer); keepaliveTimer = null }
      myTtl = Math.min(myTtl, grant.ttl)
    }
    if (grant.user_id && !user.get()) user.set({ id: grant.user_id, name: grant.name ?? null, role: null })
    publishLocks(applyLockMessage(lockMap, { ...grant, type: 'lock.acquired' }), 'granted')
    return grant
  }

  const releaseLock = (path, { timeout } = {}) => request({ type: 'lock.release', path }, { timeout })

  // ------------------------------------------------------------ saved
  const currentSent = () => (provider.ws ? sentUpdates.get(provider.ws) ?? 0 : 0)
  const checkSaved = () => {
    for (let i = saveWaiters.length - 1; i >= 0; i--) {
      const w = saveWaiters[i]
      if (w.target !== null && w.socket === provider.ws && acked >= w.target) {
        saveWaiters.splice(i, 1)
        clearTimeout(w.timer)
        w.resolve({ updates: acked, seq: savedSeq })
      }
    }
  }

  /** Resolves once every change this client made so far is stored durably by the server. */
  const whenSaved = ({ timeout = 0 } = {}) => new Promise((resolve, reject) => {
    if (destroyed) return reject(new CollabError('closed', 'the workspace connection was destroyed'))
    const ready = provider.ws && provider.synced && welcome
    const w = { socket: ready ? provider.ws : null, target: ready ? currentSent() : null, resolve, reject, timer: null }
    if (timeout > 0) {
      w.timer = setTimeout(() => {
        const i = saveWaiters.indexOf(w)
        if (i >= 0) saveWaiters.splice(i, 1)
        reject(new CollabError('timeout', `changes not acknowledged as saved within ${timeout} ms`))
      }, timeout)
    }
    saveWaiters.push(w)
    checkSaved()
  })

  // Once synced on a connection, the client's step 2 answer (everything the
  // server lacked) has been sent on it: waiters from before now count on it.
  const retargetSaveWaiters = () => {
    if (!(provider.ws && provider.synced && welcome)) return
    for (const w of saveWaiters) {
      if (w.target === null || w.socket !== provider.ws) {
        w.socket = provider.ws
        w.target = currentSent()
      }
    }
    checkSaved()
  }

  // ------------------------------------------------------------ auth
  const refreshToken = async () => {
    if (!getToken) throw new CollabError('no_token_source', 'no getToken() to refresh the token with')
    const fresh = await getToken()
    currentToken = fresh
    provider.params = { ...provider.params, token: fresh }
    if (!welcome) return null // the next connection carries it in its URL
    const ok = await request({ type: 'auth', token: fresh })
    return ok
  }

  // ------------------------------------------------------------ incoming control
  const onControl = (message) => {
    if (message.id !== undefined && message.id !== null && pending.has(message.id)) settle(message)
    switch (message.type) {
      case 'welcome':
        welcome = message
        savedSeq = message.saved_seq ?? savedSeq
        events.emit('welcome', message)
        // Requests queued while (re)connecting go out now; then the lock picture.
        sendFrame({ type: 'lock.list', id: 'sdk-lock-list' })
        for (const entry of queue.splice(0)) dispatch(entry)
        retargetSaveWaiters()
        break
      case 'saved':
        if (typeof message.updates === 'number' && message.updates > acked) acked = message.updates
        if (typeof message.seq === 'number') savedSeq = message.seq
        checkSaved()
        break
      case 'lock.state':
        if (message.you) you = message.you
        publishLocks(applyLockMessage(lockMap, message), 'state')
        break
      case 'presence.snapshot':
      case 'presence.diff': {
        const next = applyPresence(roster, message)
        const changes = rosterChanges(roster, next)
        roster = next
        participants.set(participantList(roster))
        events.emit('presence', { ...changes, message })
        break
      }
      case 'auth.ok':
        authFailures = 0
        if (message.user) user.set({ ...message.user })
        break
      case 'auth.expiring':
        if (getToken) {
          refreshToken().then((ok) => events.emit('token-refreshed', ok), (err) => events.emit('error', err))
        }
        break
      default:
        if (LOCK_BROADCASTS.has(message.type)) {
          publishLocks(applyLockMessage(lockMap, message), message.reason ?? message.type.slice(5))
        }
    }
    events.emit('control', message)
    events.emit(message.type, message)
  }

  provider.messageHandlers[MESSAGE_CONTROL] = (_encoder, decoder) => {
    const bytes = decoder.arr.subarray(decoder.pos)
    decoder.pos = decoder.arr.length
    let message
    try {
      message = decodeControlPayload(bytes)
    } catch (err) {
      events.emit('error', new CollabError('bad_control', String(err?.message ?? err)))
      return
    }
    onControl(message)
  }

  // ------------------------------------------------------------ connection life
  provider.on('status', ({ status: s }) => {
    if (s === 'connected') {
      // Opt in on every new socket, before anything else of ours.
      welcome = null
      acked = 0
      sendFrame({ type: 'hello', protocol: PROTOCOL_VERSION })
    }
    if (!destroyed) status.set(s)
    events.emit('status', { status: s })
  })
  provider.on('sync', (isSynced) => {
    synced.set(isSynced)
    events.emit('synced', isSynced)
    if (isSynced) {
      retargetSaveWaiters()
    }
  })
  provider.on('connection-close', (event) => {
    welcome = null
    synced.set(false)
    for (const [id, entry] of pending) {
      if (entry.socket !== null) {
        pending.delete(id)
        clearTimeout(entry.timer)
        entry.reject(new CollabError('disconnected', `connection closed before the answer to ${entry.message.type}`))
      }
    }
    // The server ends this connection's leases on close; the next lock.state tells the rest.
    const mine = new Map([...lockMap].filter(([, r]) => r.holder !== you))
    if (mine.size !== lockMap.size) publishLocks(mine, 'disconnect')
    you = null
    events.emit('connection-close', { code: event?.code ?? null, reason: event?.reason ?? '' })
  })
  // A terminal close (4400-4499): a 4401 with a token source gets a fresh token and reconnects.
  provider.on('closed', ({ code, reason }) => {
    if (!destroyed && code === 4401 && getToken && authFailures < MAX_AUTH_RETRIES) {
      authFailures++
      status.set('connecting')
      Promise.resolve().then(getToken).then((fresh) => {
        if (destroyed) return
        currentToken = fresh
        provider.params = { ...provider.params, token: fresh }
        provider.connect()
      }, (err) => {
        status.set('closed')
        events.emit('error', err)
        events.emit('closed', { code, reason })
      })
      return
    }
    status.set('closed')
    events.emit('closed', { code, reason })
  })

  // ------------------------------------------------------------ config changes
  const onConfig = (evts, transaction) => {
    const changes = configChanges(evts)
    if (changes.length === 0) return
    events.emit('change', { changes, local: transaction.origin !== provider, origin: transaction.origin === provider ? 'remote' : 'local' })
  }
  config.observeDeep(onConfig)

  // ------------------------------------------------------------ editing helpers
  const get = (path) => {
    let node = config
    for (const key of splitPath(path)) {
      if (!(node instanceof Y.Map)) return undefined
      node = node.get(key)
    }
    return node instanceof Y.AbstractType ? node.toJSON() : node
  }

  /** Set a value at a dotted path of `config`, creating the section maps on the way. */
  const edit = (path, value) => {
    const keys = splitPath(path)
    doc.transact(() => {
      let node = config
      for (const key of keys.slice(0, -1)) {
        let child = node.get(key)
        if (!(child instanceof Y.Map)) {
          child = new Y.Map()
          node.set(key, child)
        }
        node = child
      }
      const leaf = keys[keys.length - 1]
      if (value === undefined) node.delete(leaf)
      else node.set(leaf, value)
    })
  }

  const setFocus = (path) => provider.awareness.setLocalStateField('focus', path ?? null)

  const whenSynced = ({ timeout = 0 } = {}) => new Promise((resolve, reject) => {
    if (provider.synced && welcome) return resolve()
    let timer = null
    const check = () => {
      if (provider.synced && welcome) {
        offA(); offB(); clearTimeout(timer); resolve()
      }
    }
    const offA = events.on('synced', check)
    const offB = events.on('welcome', check)
    if (timeout > 0) timer = setTimeout(() => { offA(); offB(); reject(new CollabError('timeout', `not synced within ${timeout} ms`)) }, timeout)
  })

  const destroy = () => {
    if (destroyed) return
    destroyed = true
    clearInterval(keepaliveTimer)
    config.unobserveDeep(onConfig)
    for (const entry of pending.values()) {
      clearTimeout(entry.timer)
      entry.reject(new CollabError('closed', 'the workspace connection was destroyed'))
    }
    pending.clear()
    queue = []
    for (const w of saveWaiters.splice(0)) {
      clearTimeout(w.timer)
      w.reject(new CollabError('closed', 'the workspace connection was destroyed'))
    }
    provider.destroy()
    // The provider made the awareness (its timer keeps a Node process alive); the doc is ours only if we made it.
    provider.awareness.destroy()
    if (!givenDoc) doc.destroy()
    status.set('closed')
  }

  const ws = {
    workspace,
    doc,
    provider,
    config,
    awareness: provider.awareness,
    status: readonly(status),
    synced: readonly(synced),
    participants: readonly(participants),
    locks: readonly(locks),
    user: readonly(user),
    get holderId () { return you },
    get savedSeq () { return savedSeq },
    get welcome () { return welcome },
    on: (name, fn) => events.on(name, fn),
    once: (name, fn) => events.once(name, fn),
    off: (name, fn) => events.off(name, fn),
    request,
    acquireLock,
    releaseLock,
    whenSaved,
    whenSynced,
    refreshToken,
    get,
    edit,
    setFocus,
    destroy,
    bridgeToEventBus: null // set below (avoids an import cycle)
  }

  if (connect) {
    const start = async () => {
      if (getToken && !currentToken) {
        currentToken = await getToken()
        provider.params = { ...provider.params, token: currentToken }
      }
      if (!destroyed) provider.connect()
    }
    start().catch((err) => {
      status.set('closed')
      events.emit('error', err)
    })
  }
  return ws
}
