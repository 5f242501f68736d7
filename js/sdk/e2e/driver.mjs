// One scripted @datasource-collab/client connection for the Python tests
// (tests/test_sdk.py), in the scheme of js/client.mjs: JSON-line commands on
// stdin, JSON-line events on stdout.
//
//   node e2e/driver.mjs --url ws://127.0.0.1:PORT/ws --workspace ds-1 [--user alice] [--jwt] [--timeout 60]
//
// --user sets the development identity (?user=&name=); --jwt gets every token
// from the test: it prints {"event":"need_token"} and waits for {"cmd":"token","token":"..."}.
//
// Commands (each may carry "id", echoed in its {"event":"result","id":..,"ok":bool,...}):
//   {"cmd":"acquire","path":"connection","wait":5,"ttl":30}  -> result {grant} | {code, details}
//   {"cmd":"release","path":"connection"}                      -> result {answer} | {code}
//   {"cmd":"edit","path":"connection.host","value":"db"}       ("value" absent: delete)
//   {"cmd":"saved","timeout":10000}                            -> result {ack} once whenSaved() resolves
//   {"cmd":"focus","path":"connection.host"|null}
//   {"cmd":"dump"}  -> result {config, participants, locks, status, synced, user, holder}
//   {"cmd":"bridge"}  start bridgeToEventBus: every bus event is printed as {"event":"bus","name":..,"payload":..}
//   {"cmd":"close"}   destroy the workspace and exit 0
// Events: ready; status; synced; control (every control message); change; bus;
// connection-close; closed; error; exited.
import WebSocket from 'ws'
import { createInterface } from 'node:readline'
import { connectWorkspace } from '@datasource-collab/client'

const args = {}
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i]
  const next = process.argv[i + 1]
  if (next === undefined || next.startsWith('--')) args[a.slice(2)] = true
  else { args[a.slice(2)] = next; i++ }
}
const emit = (obj) => process.stdout.write(JSON.stringify(obj, (_k, v) => (v === undefined ? null : v)) + '\n')

const tokenWaiters = []
const getToken = () => new Promise((resolve) => {
  tokenWaiters.push(resolve)
  emit({ event: 'need_token' })
})

const ws = connectWorkspace({
  url: args.url,
  workspace: args.workspace,
  WebSocketPolyfill: WebSocket,
  params: args.user ? { user: args.user, name: args.user[0].toUpperCase() + args.user.slice(1) } : {},
  ...(args.jwt ? { getToken } : {})
})

ws.on('status', ({ status }) => emit({ event: 'status', status }))
ws.on('synced', (synced) => emit({ event: 'synced', synced }))
ws.on('control', (message) => emit({ event: 'control', message }))
ws.on('change', (change) => emit({ event: 'change', ...change, config: ws.config.toJSON() }))
ws.on('connection-close', (e) => emit({ event: 'connection-close', ...e }))
ws.on('closed', (e) => emit({ event: 'closed', ...e }))
ws.on('error', (err) => emit({ event: 'error', message: String(err?.message ?? err) }))

const result = (id, ok, body) => emit({ event: 'result', id, ok, ...body })
const failure = (err) => ({ code: err?.code ?? 'exception', message: String(err?.message ?? err), details: err?.details ?? null })

let exiting = false
async function finish (code = 0) {
  if (exiting) return
  exiting = true
  ws.destroy()
  emit({ event: 'exited' })
  process.stdout.write('', () => process.exit(code))
}

async function handle (msg) {
  const { id } = msg
  switch (msg.cmd) {
    case 'token':
      tokenWaiters.shift()?.(msg.token)
      return
    case 'acquire':
      ws.acquireLock(msg.path, { wait: msg.wait, ttl: msg.ttl }).then(
        (grant) => result(id, true, { grant }), (err) => result(id, false, failure(err)))
      return
    case 'release':
      ws.releaseLock(msg.path).then((answer) => result(id, true, { answer }), (err) => result(id, false, failure(err)))
      return
    case 'edit':
      ws.edit(msg.path, 'value' in msg ? msg.value : undefined)
      break
    case 'saved':
      ws.whenSaved({ timeout: msg.timeout ?? 10000 }).then((ack) => result(id, true, { ack }), (err) => result(id, false, failure(err)))
      return
    case 'focus':
      ws.setFocus(msg.path)
      break
    case 'bridge':
      ws.bridgeToEventBus({ emit: (name, payload) => emit({ event: 'bus', name, payload }) })
      break
    case 'dump':
      result(id, true, {
        config: ws.config.toJSON(),
        participants: ws.participants.get(),
        locks: ws.locks.get(),
        status: ws.status.get(),
        synced: ws.synced.get(),
        user: ws.user.get(),
        holder: ws.holderId
      })
      return
    case 'close':
      result(id, true, {})
      await finish(0)
      return
    default:
      throw new Error(`unknown command ${msg.cmd}`)
  }
  result(id, true, {})
}

emit({ event: 'ready', clientID: ws.doc.clientID })
createInterface({ input: process.stdin })
  .on('line', (line) => {
    if (!line.trim()) return
    let msg
    try { msg = JSON.parse(line) } catch (err) { emit({ event: 'error', message: `bad JSON: ${err.message}` }); return }
    handle(msg).catch((err) => result(msg.id, false, failure(err)))
  })
  .on('close', () => finish(0))
setTimeout(() => { emit({ event: 'error', message: 'hard timeout' }); finish(3) }, Number(args.timeout ?? 90) * 1000).unref()
