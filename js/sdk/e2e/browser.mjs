// Browser test of the package (driven by tests/test_sdk_browser.py): esbuild
// bundles e2e/page.js, Debian's Chromium (through playwright-core) opens it in two
// contexts (served by a loopback HTTP server of this script), and this script plays:
//   1. lock contention between the two contexts;
//   2. a rejected edit shown to its author (locked, then invalid), and not to the other;
//   3. {"event":"need_restart"} -> the test restarts the server and answers {"cmd":"restarted"};
//      both pages reconnect, an edit syncs, and locks work again.
// Prints JSON lines; the last is {"event":"passed"} (exit 0) or {"event":"failed"} (exit 1).
// A browser that cannot start is a failure (exit 2), never a skip.
//
//   node e2e/browser.mjs --server http://127.0.0.1:PORT [--chromium /usr/bin/chromium] [--timeout 120]
import { build } from 'esbuild'
import { chromium } from 'playwright-core'
import { createInterface } from 'node:readline'
import { readFile } from 'node:fs/promises'
import { fileURLToPath } from 'node:url'
import { createServer } from 'node:http'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')
const here = (name) => fileURLToPath(new URL(name, import.meta.url))
const server = args.server
const wsUrl = server.replace(/^http/, 'ws') + '/ws'
const workspace = 'ds-browser'
const T = 15000

let browser = null
async function fail (error, code = 1) {
  emit({ event: 'failed', error: String(error?.stack ?? error) })
  try { if (browser) await browser.close() } catch { /* already gone */ }
  process.exit(code)
}
setTimeout(() => fail(new Error('hard timeout')), Number(args.timeout ?? 120) * 1000).unref()

const lines = createInterface({ input: process.stdin })
const commands = []
const waiting = []
lines.on('line', (line) => { const msg = JSON.parse(line); const w = waiting.shift(); if (w) w(msg); else commands.push(msg) })
const nextCommand = () => new Promise((resolve) => { const c = commands.shift(); if (c) resolve(c); else waiting.push(resolve) })

const bundled = await build({
  entryPoints: [here('page.js')], bundle: true, format: 'iife', platform: 'browser', write: false, logLevel: 'silent'
})
const bundle = bundled.outputFiles[0].text
const html = await readFile(here('page.html'), 'utf8')
emit({ event: 'bundled', bytes: bundle.length })

// The page comes from a real loopback HTTP server of ours (another origin than the
// collaboration server, as an SPA's would be): Chromium's local-network-access
// checks treat a page it fetched from loopback like any local page.
const pages = createServer((req, res) => {
  const js = req.url.endsWith('/bundle.js')
  res.writeHead(200, { 'content-type': js ? 'text/javascript' : 'text/html; charset=utf-8' })
  res.end(js ? bundle : html)
})
await new Promise((resolve) => pages.listen(0, '127.0.0.1', resolve))
const pageUrl = `http://127.0.0.1:${pages.address().port}/index.html`

try {
  browser = await chromium.launch({
    executablePath: args.chromium ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run'],
    timeout: 30000
  })
} catch (err) {
  await fail(new Error(`the browser did not start: ${err.message}`), 2)
}
emit({ event: 'browser', version: browser.version() })

const consoleErrors = []
async function openPage (user) {
  const context = await browser.newContext()
  const page = await context.newPage()
  page.on('pageerror', (err) => consoleErrors.push(`${user}: ${err}`))
  await page.goto(pageUrl)
  await page.evaluate((o) => window.app.connect(o), { url: wsUrl, workspace, user })
  await page.waitForSelector('body[data-status="connected"][data-synced="true"]', { timeout: T })
  return page
}
const check = (cond, what) => { if (!cond) throw new Error(`check failed: ${what}`) }
const items = (page, id) => page.$$eval(`#${id} li`, (lis) => lis.map((x) => x.textContent))

try {
  const alice = await openPage('alice')
  const bob = await openPage('bob')
  await alice.waitForFunction(() => document.querySelectorAll('#participants li').length === 2, null, { timeout: T })

  // 1. Lock contention between two contexts.
  const grant = await alice.evaluate(() => window.app.acquire('connection', { ttl: 30 }))
  check(grant.ok && grant.grant.user_id === 'alice', `alice's grant ${JSON.stringify(grant)}`)
  const conflict = await bob.evaluate(() => window.app.acquire('connection.host'))
  check(!conflict.ok && conflict.code === 'conflict', `bob's conflict ${JSON.stringify(conflict)}`)
  await bob.waitForFunction(() => document.getElementById('locks').textContent.includes('connection by alice'), null, { timeout: T })
  const queued = bob.evaluate(() => window.app.acquire('connection', { wait: 10 }))
  await alice.evaluate(() => window.app.release('connection'))
  const bobGrant = await queued
  check(bobGrant.ok && bobGrant.grant.fence > grant.grant.fence, `bob's grant after the wait ${JSON.stringify(bobGrant)}`)
  await alice.waitForFunction(() => document.getElementById('locks').textContent === 'connection by bob', null, { timeout: T })
  await bob.waitForFunction(() => document.getElementById('locks').textContent === 'connection by bob (you)', null, { timeout: T })
  emit({ event: 'step', step: 'locks' })

  // 2. A rejected edit shown to its author.
  await bob.evaluate(() => window.app.edit('connection.host', 'db.internal'))
  await alice.waitForFunction(() => window.app.config().connection?.host === 'db.internal', null, { timeout: T })
  await alice.evaluate(() => window.app.edit('connection.host', 'hijack'))
  await alice.waitForSelector('#rejections li', { timeout: T })
  const shown = await items(alice, 'rejections')
  check(shown.length === 1 && shown[0] === 'locked: connection.host held by bob', `alice sees ${JSON.stringify(shown)}`)
  await alice.waitForFunction(() => window.app.config().connection?.host === 'db.internal', null, { timeout: T })
  await bob.evaluate(() => window.app.release('connection'))
  await bob.evaluate(() => window.app.edit('connection.port', 99999))
  await bob.waitForSelector('#rejections li', { timeout: T })
  const bobShown = await items(bob, 'rejections')
  check(bobShown.length === 1 && bobShown[0].startsWith('invalid: connection.port — ') && bobShown[0].includes('65535'), `bob sees ${JSON.stringify(bobShown)}`)
  await bob.waitForFunction(() => window.app.config().connection?.port === undefined, null, { timeout: T })
  check((await items(alice, 'rejections')).length === 1, 'alice is not shown bob\'s rejection')
  const saved = await bob.evaluate(() => window.app.saved())
  check(saved.updates >= 2, `bob's saved ${JSON.stringify(saved)}`)
  emit({ event: 'step', step: 'rejected' })

  // 3. Reconnect after a server restart.
  emit({ event: 'need_restart' })
  const cmd = await nextCommand()
  check(cmd.cmd === 'restarted', `expected restarted, got ${JSON.stringify(cmd)}`)
  for (const page of [alice, bob]) {
    await page.waitForSelector('body[data-status="connected"][data-synced="true"]', { timeout: 30000 })
  }
  await bob.evaluate(() => window.app.edit('name', 'after restart'))
  await alice.waitForFunction(() => window.app.config().name === 'after restart', null, { timeout: T })
  check((await alice.evaluate(() => window.app.config())).connection.host === 'db.internal', 'the document survived the restart')
  const again = await alice.evaluate(() => window.app.acquire('name'))
  check(again.ok, `lock after restart ${JSON.stringify(again)}`)
  const refused = await bob.evaluate(() => window.app.acquire('name'))
  check(!refused.ok && refused.code === 'conflict', `conflict after restart ${JSON.stringify(refused)}`)
  await bob.waitForFunction(() => document.querySelectorAll('#participants li').length === 2, null, { timeout: T })
  emit({ event: 'step', step: 'restart' })
  check(consoleErrors.length === 0, `page errors: ${consoleErrors.join(' | ')}`)
  emit({ event: 'passed' })
  await browser.close()
  pages.close()
  process.exit(0)
} catch (err) {
  await fail(err)
}
