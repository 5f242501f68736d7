// Drives the operator console (/admin) in headless Chromium (Debian's package)
// through playwright-core, for tests.
//
//   node console.mjs --url 'http://127.0.0.1:PORT/admin?user=ops&role=admin' [--chromium /usr/bin/chromium] [--timeout 60]
//
// Commands (JSON lines on stdin; events as JSON lines on stdout, as panel.mjs):
//   {"cmd":"wait","selector":"#locks tbody tr[data-lock]","text":"connection.host","gone":false,"timeout":5000}
//        until an element matching the selector (containing the text, if given) exists (or, gone: none does)
//   {"cmd":"rows","table":"locks"}  -> {"event":"rows","rows":[["cell", ...], ...]}  the table's body as text
//   {"cmd":"click","selector":"..."}             a mouse click
//   {"cmd":"press","selector":"...","key":"Enter"}  focus the element, press a key (keyboard use)
//   {"cmd":"key","key":"r"}                      a key pressed on the page
//   {"cmd":"text","selector":"#status"}          -> {"event":"text","text":...}
//   {"cmd":"screenshot","path":"/abs/file.png"}
//   {"cmd":"close"}
// Events: {"event":"ready"} once the console has rendered data once;
// {"event":"console",...} for page errors; {"event":"closed"}.
// The process exits by itself when stdin closes or after --timeout seconds.

import { chromium } from 'playwright-core'
import { createInterface } from 'node:readline'

const args = {}
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1]
if (!args.url) {
  process.stderr.write('usage: node console.mjs --url http://host:port/admin?...\n')
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
// A laptop screen.
const page = await browser.newPage({ viewport: { width: 1366, height: 768 }, deviceScaleFactor: 1 })
page.on('console', (msg) => { if (msg.type() === 'error') emit({ event: 'console', type: 'error', text: msg.text() }) })
page.on('pageerror', (err) => emit({ event: 'console', type: 'pageerror', text: String(err) }))
const response = await page.goto(args.url)
if (!response.ok()) {
  emit({ event: 'error', message: `GET ${args.url}: ${response.status()}` })
  await shutdown('http-error', 4)
}
await page.waitForSelector('body[data-loaded]', { timeout: 15000 })
emit({ event: 'ready' })

const commands = {
  async wait ({ selector, text, gone = false, timeout = 5000 }) {
    await page.waitForFunction(([sel, t, g]) => {
      const hit = [...document.querySelectorAll(sel)].some((el) => t == null || el.textContent.includes(t))
      return g ? !hit : hit
    }, [selector, text ?? null, gone], { timeout, polling: 100 })
  },
  async rows ({ table }) {
    const rows = await page.evaluate((id) => [...document.querySelectorAll(`#${id} tbody tr`)]
      .map((tr) => [...tr.cells].map((td) => td.innerText.trim())), table)
    return { event: 'rows', rows }
  },
  async click ({ selector }) { await page.click(selector, { timeout: 5000 }) },
  async press ({ selector, key }) {
    await page.focus(selector, { timeout: 5000 })
    await page.keyboard.press(key)
  },
  async key ({ key }) { await page.keyboard.press(key) },
  async text ({ selector }) { return { event: 'text', text: await page.textContent(selector) } },
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
