// Hocuspocus for `python -m loadtest compare`: in memory, no extensions, no auth hook.
// PORT (default 0 = any free port) and HOST (default 127.0.0.1); prints "listening on PORT".
import { Server } from '@hocuspocus/server'

const server = new Server({
  port: Number(process.env.PORT || 0),
  address: process.env.HOST || '127.0.0.1',
  quiet: true,
  stopOnSignals: true,
})
await server.listen()
console.log(`listening on ${server.address.port}`)
