// The example passes the `ws` class as WebSocketPolyfill; its own types are not needed here.
declare module 'ws' {
  const WebSocket: unknown
  export default WebSocket
}
