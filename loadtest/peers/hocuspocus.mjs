// Hocuspocus for `python -m loadtest compare`: in memory, no auth hook, no persistence.
// One hook: documents are not unloaded when their last client leaves (Hocuspocus without a
// persistence extension would drop them), so the harness's convergence probe, which joins after
// every load client has closed, reads the document -- as the reference server keeps it in memory.
// PORT (default 0 = any free port) and HOST (default 127.0.0.1); prints "listening on PORT".
import { Server } from '@hocuspocus/server'

const server = new Server({
  port: Number(process.env.PORT || 0),
  address: process.env.HOST || '127.0.0.1',
  quiet: true,
  stopOnSignals: true,
  extensions: [{ async beforeUnloadDocument () { throw new Error('kept in memory for the benchmark probe') } }],
})
await server.listen()
console.log(`listening on ${server.address.port}`)
