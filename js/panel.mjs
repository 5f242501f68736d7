// Drives the participant-awareness panel in headless Chromium (Debian's
// package) through playwright-core, for tests.
//
//   node panel.mjs --url http://127.0.0.1:PORT/workspaces/ds-1 [--chromium /usr/bin/chromium] [--timeout 60]
//
// Commands arrive as JSON lines on stdin; events leave as JSON lines on stdout
// (the same scheme as client.mjs). Every command may carry an "id", echoed in
// its {"event":"ack"} or {"event":"error"}.
//
// Commands:
//   {"cmd":"wait_user","user":"bob","present":true|false,"timeout":5000}
//        until the card of that user is shown (or gone)
//   {"cmd":"wait_text","selector":"#feed","text":"bob left","timeout":5000}
//   {"cmd":"state"}   -> {"event":"state","status":..,"participants":[{user_id,name,editing,locks,connections}],"feed":[...]}
//   {"cmd":"screenshot","path":"/abs/file.png"}
//   {"cmd":"close"}   close the browser and exit 0
//
// Events: {"event":"ready"} once the page shows a live roster;
// {"event":"console","type":"error",...} for page errors; {"event":"closed"}.
// The process exits by itself when stdin closes or after --timeout seconds.

import { chromium } from 'playwright-core'
import { createInterface } from 'node:readline'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
if (!args.url) {
  process.stderr.write('usage: node panel.mjs --url http://host:port/workspaces/ID\n')
  process.exit(2)
}

const emit = (event) => process.stdout.write(JSON.stringify(event) + '\n')
let browser = null
let exiting = false

async function shutdown (reason, code = 0) {
  if (exiting) return
  exiting = true
  try { if (browser) await browser.close() } catch {}
  emit({ event: 'closed', reason })
  process.exit(code)
}

setTimeout(() => shutdown('timeout', 3), Number(args.timeout ?? 60) * 1000).unref()

browser = await chromium.launch({
  executablePath: args.chromium ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run'],
  timeout: 30000
})
const page = await browser.newPage({ viewport: { width: 640, height: 560 }, deviceScaleFactor: 1 })
page.on('console', (msg) => { if (msg.type() === 'error') emit({ event: 'console', type: 'error', text: msg.text() }) })
page.on('pageerror', (err) => emit({ event: 'console', type: 'pageerror', text: String(err) }))
await page.goto(args.url)
await page.waitForSelector('body[data-status="live"]', { timeout: 15000 })
emit({ event: 'ready' })

async function state () {
  return page.evaluate(() => ({
    status: document.body.dataset.status,
    participants: [...document.querySelectorAll('#participants > li')].map((li) => ({
      user_id: li.dataset.userId,
      name: li.querySelector('.name').textContent,
      editing: li.dataset.editing || null,
      locks: [...li.querySelectorAll('[data-lock]')].map((x) => x.dataset.lock),
      connections: Number(li.querySelector('[data-connections]')?.dataset.connections ?? 1),
      color: li.querySelector('.avatar').style.background
    })),
    feed: [...document.querySelectorAll('#feed > li')].map((li) => ({ kind: li.dataset.kind, user_id: li.dataset.userId, text: li.querySelector('.what').textContent }))
  }))
}

const commands = {
  async wait_user ({ user, present = true, timeout = 5000 }) {
    await page.waitForSelector(`#participants > li[data-user-id="${user}"]`, { state: present ? 'attached' : 'detached', timeout })
  },
  async wait_text ({ selector, text, timeout = 5000 }) {
    await page.waitForFunction(([sel, t]) => document.querySelector(sel)?.textContent.includes(t), [selector, text], { timeout })
  },
  async state () { return { event: 'state', ...(await state()) } },
  async screenshot ({ path }) { await page.screenshot({ path, fullPage: true }) },
  async close () { await shutdown('close') }
}

const rl = createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  let command
  try { command = JSON.parse(line) } catch { emit({ event: 'error', message: 'not JSON' }); return }
  const handler = commands[command.cmd]
  if (!handler) { emit({ event: 'error', id: command.id, message: `unknown command ${command.cmd}` }); return }
  try {
    const reply = await handler(command)
    if (reply) emit({ ...reply, id: command.id })
    emit({ event: 'ack', id: command.id, cmd: command.cmd })
  } catch (err) {
    emit({ event: 'error', id: command.id, message: String(err && err.message ? err.message : err) })
  }
})
rl.on('close', () => shutdown('stdin-eof'))
