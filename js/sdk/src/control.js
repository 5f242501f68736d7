// The control channel: message type 100, a msgpack map after the type byte.
// (docs/protocol.md, "Control channel"). varUint(100) is the single byte 0x64.
import { encode, decode } from '@msgpack/msgpack'

export const MESSAGE_CONTROL = 100
export const PROTOCOL_VERSION = 1

/** One control frame: 0x64 followed by msgpack(message). */
export function encodeControl (message) {
  if (message === null || typeof message !== 'object' || typeof message.type !== 'string') {
    throw new TypeError('a control message is an object with a string "type"')
  }
  const body = encode(message)
  const frame = new Uint8Array(body.length + 1)
  frame[0] = MESSAGE_CONTROL
  frame.set(body, 1)
  return frame
}

/** The map of a control frame's payload (the bytes after the type byte). */
export function decodeControlPayload (bytes) {
  const message = decode(bytes)
  if (message === null || typeof message !== 'object' || typeof message.type !== 'string') {
    throw new TypeError('control payload is not a map with a string "type"')
  }
  return message
}

/** Whether an outgoing frame is one the server counts in `saved.updates`: sync step 2 or update. */
export function isUpdateFrame (data) {
  const bytes = data instanceof Uint8Array ? data : ArrayBuffer.isView(data) ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : data instanceof ArrayBuffer ? new Uint8Array(data) : null
  return bytes !== null && bytes.length >= 2 && bytes[0] === 0 && (bytes[1] === 1 || bytes[1] === 2)
}
