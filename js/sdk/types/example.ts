// Compiled by `tsc --noEmit` (npm run typecheck): the declarations as an app uses them,
// imported by the package's own name so the `exports`/`types` mapping is checked too.
import * as Y from 'yjs'
import WebSocket from 'ws'
import {
  connectWorkspace, bridgeToEventBus, CollabError, EVENT_NAMES,
  type Workspace, type Participant, type LockInfo, type RejectedMessage, type ConnectionStatus
} from '@datasource-collab/client'

export async function example (): Promise<void> {
  const ws: Workspace = connectWorkspace({
    url: 'ws://127.0.0.1:8765/ws',
    workspace: 'ds-1',
    getToken: async () => 'token',
    doc: new Y.Doc(),
    WebSocketPolyfill: WebSocket
  })
  const config: Y.Map<unknown> = ws.config
  config.set('name', 'Orders')
  const status: ConnectionStatus = ws.status.get()
  const stop = ws.participants.subscribe((list: Participant[]) => {
    for (const p of list) console.log(p.user_id, p.editing, p.locks.join(','))
  })
  stop()
  ws.locks.subscribe((locks: LockInfo[]) => locks.filter((l) => l.mine).map((l) => l.fence + 1))
  ws.on('rejected', (msg: RejectedMessage) => console.log(msg.paths, msg.reason, msg.errors?.[0]?.msg))
  ws.on('forward.failed', (msg) => console.log(msg.status, msg.paths))
  ws.on('forwarded', (msg) => console.log(msg.pending === 0))
  ws.on('saved', (msg) => console.log(msg.seq))
  try {
    const grant = await ws.acquireLock('connection', { wait: 5, ttl: 30 })
    console.log(grant.fence, grant.expires_at, status)
    ws.edit('connection.host', 'db.internal')
    const saved = await ws.whenSaved({ timeout: 5000 })
    console.log(saved.updates)
    await ws.releaseLock('connection')
  } catch (err) {
    if (err instanceof CollabError) console.log(err.code, err.details)
  }
  const events: string[] = []
  const off = bridgeToEventBus(ws, { emit: (name: string) => { events.push(name) } }, { dataSourceId: 'ds-1' })
  off()
  ws.bridgeToEventBus({ emit: () => undefined })
  console.log(EVENT_NAMES.locked === 'collaboration:data_source:locked')
  ws.destroy()
}
