// The React hook of js/README.md, tested as code: the ```jsx block is extracted,
// compiled by esbuild, rendered with react-test-renderer in Node and driven
// against a real server, with a second client (bob) on the same data source.
//
//   node e2e/readme-hook.mjs --url ws://127.0.0.1:PORT/ws
// Prints {"event":"step",...} lines and {"event":"passed"} (exit 0), or {"event":"failed"} (exit 1).
import { build } from 'esbuild'
import { readFile, mkdir } from 'node:fs/promises'
import { fileURLToPath, pathToFileURL } from 'node:url'
import WebSocket from 'ws'
import React from 'react'
import TestRenderer from 'react-test-renderer'
import { connectWorkspace } from '@datasource-collab/client'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')
const sdkDir = fileURLToPath(new URL('..', import.meta.url))
globalThis.IS_REACT_ACT_ENVIRONMENT = true
const { act } = TestRenderer
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
setTimeout(() => { emit({ event: 'failed', error: 'hard timeout' }); process.exit(1) }, 90000).unref()

async function until (predicate, what, timeout = 15000) {
  const deadline = Date.now() + timeout
  for (;;) {
    await act(async () => { await sleep(20) })
    if (predicate()) return
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
  }
}
const text = (node) => (typeof node === 'string' ? node : node.children.map(text).join(''))

try {
  // 1. The code block, exactly as documented.
  const readme = await readFile(new URL('../../README.md', import.meta.url), 'utf8')
  const blocks = [...readme.matchAll(/```jsx\n([\s\S]*?)```/g)].map((m) => m[1])
  if (blocks.length !== 1) throw new Error(`expected one jsx block in js/README.md, found ${blocks.length}`)
  await mkdir(`${sdkDir}.readme-test`, { recursive: true })
  const outfile = `${sdkDir}.readme-test/useDataSourceCollaboration.mjs`
  await build({
    stdin: { contents: blocks[0], loader: 'jsx', resolveDir: sdkDir, sourcefile: 'js/README.md' },
    bundle: true, packages: 'external', format: 'esm', platform: 'node', jsx: 'automatic', outfile, logLevel: 'silent'
  })
  const mod = await import(pathToFileURL(outfile).href)
  emit({ event: 'step', step: 'compiled', exports: Object.keys(mod).sort() })

  mod.collabSettings.url = args.url
  mod.collabSettings.WebSocketPolyfill = WebSocket
  mod.collabSettings.params = { user: 'alice', name: 'Alice' }

  // 2. Render the field, plus a probe holding the hook's latest result (its own connection).
  const ds = 'ds-readme'
  let hook = null
  const Probe = () => { hook = mod.useDataSourceCollaboration(ds); return null }
  let renderer
  await act(async () => {
    renderer = TestRenderer.create(React.createElement(React.Fragment, null,
      React.createElement(Probe), React.createElement(mod.HostField, { dataSourceId: ds })))
  })
  const input = () => renderer.root.findByType('input')
  const alerts = () => renderer.root.findAllByType('p').filter((n) => n.props.role === 'alert').map(text)
  await until(() => hook.status === 'connected' && hook.participants.some((p) => p.user_id === 'alice'), 'alice connected')
  emit({ event: 'step', step: 'connected' })

  // 3. Bob takes the lock: the field is disabled and says who is editing.
  const bob = connectWorkspace({ url: args.url, workspace: ds, WebSocketPolyfill: WebSocket, params: { user: 'bob', name: 'Bob' } })
  await bob.whenSynced({ timeout: 15000 })
  await bob.acquireLock('connection')
  await until(() => input().props.disabled === true && renderer.root.findAllByType('small').map(text).join() === 'Bob is editing', 'field locked by bob')
  // The roster comes on its own (coalesced) feed: wait for it, it need not be there yet.
  await until(() => hook.participants.map((p) => p.user_id).sort().join() === 'alice,bob', 'bob in the roster')
  emit({ event: 'step', step: 'locked-by-other' })

  // 4. An edit anyway is refused and shown to its author; the value comes back.
  bob.edit('connection.host', 'db.internal')
  await until(() => input().props.value === 'db.internal', 'bob\'s host in the field')
  await act(async () => { input().props.onChange({ target: { value: 'hijack' } }) })
  await until(() => alerts().join() === 'Not saved (locked): connection.host', 'the rejection shown')
  await until(() => input().props.value === 'db.internal', 'value restored')
  emit({ event: 'step', step: 'rejected' })

  // 5. Bob lets go; focus takes the lock for alice, her edit reaches bob, blur releases it.
  await bob.releaseLock('connection')
  await until(() => input().props.disabled === false, 'field unlocked')
  await act(async () => { input().props.onFocus() })
  // (The probe is a second connection of alice's: the lease is not *its*, but it sees it.)
  await until(() => bob.locks.get().map((l) => `${l.path}:${l.user_id}`).join() === 'connection:alice' &&
    hook.lock.holderOf('connection.host')?.user_id === 'alice', 'alice holds the lock')
  await act(async () => { input().props.onChange({ target: { value: 'db2.internal' } }) })
  await until(() => bob.get('connection.host') === 'db2.internal', 'alice\'s edit at bob')
  await act(async () => { input().props.onBlur() })
  await until(() => bob.locks.get().length === 0, 'lock released on blur')
  await act(async () => { await hook.whenSaved() })
  if (alerts().length !== 1) throw new Error(`unexpected alerts ${alerts()}`)
  emit({ event: 'step', step: 'edited' })

  // 6. Unmounting disconnects: bob sees alice leave.
  await act(async () => { renderer.unmount() })
  await until(() => bob.participants.get().map((p) => p.user_id).join() === 'bob', 'alice left')
  emit({ event: 'step', step: 'unmounted' })
  bob.destroy()
  emit({ event: 'passed' })
  process.exit(0)
} catch (err) {
  emit({ event: 'failed', error: String(err?.stack ?? err) })
  process.exit(1)
}
