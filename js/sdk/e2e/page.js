// The browser test page (bundled by esbuild in e2e/browser.mjs): a tiny data-source
// screen on the package. It shows the connection status, the roster, the locks
// and the rejections of this user's edits, and exposes window.app for the test.
import { connectWorkspace } from '@datasource-collab/client'

const el = (id) => document.getElementById(id)
const li = (text) => { const item = document.createElement('li'); item.textContent = text; return item }

window.app = {
  ws: null,
  connect ({ url, workspace, user }) {
    const ws = connectWorkspace({ url, workspace, params: { user, name: user } })
    this.ws = ws
    ws.status.subscribe((s) => { document.body.dataset.status = s; el('status').textContent = s })
    ws.synced.subscribe((s) => { document.body.dataset.synced = String(s) })
    ws.participants.subscribe((list) => el('participants').replaceChildren(
      ...list.map((p) => li(`${p.user_id}${p.locks.length ? ' 🔒 ' + p.locks.join(',') : ''}`))))
    ws.locks.subscribe((locks) => el('locks').replaceChildren(
      ...locks.map((l) => li(`${l.path} by ${l.user_id}${l.mine ? ' (you)' : ''}`))))
    ws.on('rejected', (msg) => el('rejections').append(
      li(`${msg.reason}: ${msg.paths.join(',')}${msg.user_id ? ' held by ' + msg.user_id : ''}${msg.errors ? ' — ' + msg.errors.map((e) => e.msg).join('; ') : ''}`)))
    ws.on('change', () => { el('config').textContent = JSON.stringify(ws.config.toJSON()) })
    return true
  },
  async acquire (path, opts) {
    try { return { ok: true, grant: await this.ws.acquireLock(path, opts) } } catch (err) { return { ok: false, code: err.code } }
  },
  async release (path) {
    try { await this.ws.releaseLock(path); return { ok: true } } catch (err) { return { ok: false, code: err.code } }
  },
  edit (path, value) { this.ws.edit(path, value); return true },
  async saved () { return this.ws.whenSaved({ timeout: 15000 }) },
  config () { return this.ws.config.toJSON() }
}
