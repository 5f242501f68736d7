// @datasource-collab/client: the stock Yjs WebsocketProvider plus our control
// channel (docs/protocol.md). See js/README.md.
import { connectWorkspace as connect, CollabError } from './workspace.js'
import { bridgeToEventBus, EVENT_NAMES } from './bridge.js'

export function connectWorkspace (options) {
  const ws = connect(options)
  ws.bridgeToEventBus = (bus, opts) => bridgeToEventBus(ws, bus, opts)
  return ws
}

export { CollabError, bridgeToEventBus, EVENT_NAMES }
export { encodeControl, decodeControlPayload, MESSAGE_CONTROL, PROTOCOL_VERSION } from './control.js'
export { applyPresence, participantList } from './roster.js'
export { applyLockMessage, covers } from './locks.js'
export { createObservable } from './observable.js'
