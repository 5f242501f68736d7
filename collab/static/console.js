// The operator console: polls GET /api/admin/console and renders it; buttons call
// the admin API. The page's own query string (?token=... or, in development,
// ?user=...&role=admin) is passed on to every request: the same gate as the page.
'use strict'
const POLL_MS = 2000
const auth = new URLSearchParams(location.search)
let paused = false
let timer = null
let watched = (auth.get('watch') || '').split(',').filter(Boolean)
auth.delete('watch')

const $ = (sel) => document.querySelector(sel)
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]))
const json = (v) => v === undefined ? '<span class="muted">(none)</span>' : `<code>${esc(JSON.stringify(v))}</code>`
const ago = (t, now) => t ? `${Math.max(0, Math.round(now - t))} s ago` : ''
const enc = encodeURIComponent

function url (path, extra = {}) {
  const q = new URLSearchParams(auth)
  for (const [k, v] of Object.entries(extra)) q.set(k, v)
  const s = q.toString()
  return s ? `${path}?${s}` : path
}

function say (text, bad = false) {
  const el = $('#status')
  el.textContent = text
  el.className = bad ? 'bad' : ''
}

function fill (id, rows, empty) {
  const body = document.querySelector(`#${id} tbody`)
  const cols = document.querySelectorAll(`#${id} thead th`).length
  body.innerHTML = rows.length ? rows.join('') : `<tr><td colspan="${cols}" class="muted">${empty}</td></tr>`
}

function render (data) {
  $('#node').textContent = data.node
  const fw = data.forwarding || {}
  const totals = fw.totals || {}
  $('#summary').textContent = `${data.rooms.length} rooms, ${data.connections} connections` +
    (fw.recording ? `, ${totals.pending ?? 0} changes pending, ${totals.dead ?? 0} dead letters in the store` : '') +
    (data.accepting ? '' : ' — NOT ACCEPTING')
  $('#updated').textContent = new Date(data.now * 1000).toLocaleTimeString()

  fill('rooms', data.rooms.map((r) => `<tr data-workspace="${esc(r.workspace)}"><td><a href="${esc(url('/workspaces/' + enc(r.workspace)))}">${esc(r.workspace)}</a></td>
    <td>${r.peers.map((p) => `${esc(p.user?.id ?? p.user?.user_id ?? '?')} <span class="muted">@ ${esc(p.address)}</span>`).join('<br>') || '<span class="muted">none</span>'}</td>
    <td>${esc((r.nodes || []).join(', '))}</td><td class="num">${esc(r.size_bytes)}</td><td class="num">${esc(r.durable_seq)}</td></tr>`), 'no room is open on this node')

  const parts = []
  for (const r of data.rooms) {
    for (const p of r.participants || []) {
      parts.push(`<tr><td>${esc(r.workspace)}</td><td>${esc(p.name)} <span class="muted">(${esc(p.user_id)})</span></td><td>${esc(p.role)}</td>
        <td class="num">${esc(p.connections)}</td><td>${esc((p.nodes || []).join(', '))}</td><td>${esc(p.editing ?? '')}</td></tr>`)
    }
  }
  fill('participants', parts, 'nobody')

  const locks = []
  for (const r of data.rooms) {
    for (const l of r.locks || []) {
      const left = l.expires_at ? `${Math.max(0, Math.round(l.expires_at - data.now))} s` : ''
      locks.push(`<tr data-lock="${esc(r.workspace)}/${esc(l.path)}"><td>${esc(r.workspace)}</td><td><code>${esc(l.path)}</code></td>
        <td>${esc(l.name ?? l.user_id)} <span class="muted">(${esc(l.user_id)})</span></td><td class="num">${left}</td>
        <td><button data-action="release" data-workspace="${esc(r.workspace)}" data-path="${esc(l.path)}">Force-release</button></td></tr>`)
    }
  }
  fill('locks', locks, 'no locks held')

  const ws = fw.workspaces || []
  fill('forwarding', ws.map((w) => {
    const lane = w.lane || {}
    if (w.error) return `<tr data-forwarding="${esc(w.workspace)}"><td>${esc(w.workspace)}</td><td colspan="5" class="bad">${esc(w.error)}</td></tr>`
    const state = lane.retrying ? `<span class="bad">retrying: ${esc(lane.last_error)}</span>` : (w.forwarding ? (lane.active ? 'delivering' : 'idle') : 'no backend')
    return `<tr data-forwarding="${esc(w.workspace)}"><td>${esc(w.workspace)}</td><td class="num">${esc(w.pending)}</td>
      <td class="num ${w.lag_seconds > 60 ? 'bad' : ''}">${esc(w.lag_seconds)} s</td>
      <td class="num">${esc(w.recorded_seq)} → ${esc(w.delivered_seq)}</td>
      <td class="num ${w.dead_letters ? 'bad' : ''}">${esc(w.dead_letters)}</td><td>${state}</td></tr>`
  }), fw.recording ? 'nothing to forward' : 'this store keeps no outbox')

  const dead = []
  for (const w of ws) {
    for (const d of w.dead || []) {
      dead.push(`<tr data-dead="${esc(w.workspace)}/${esc(d.key)}"><td>${esc(w.workspace)}</td><td class="num">${esc(d.first_seq)}–${esc(d.seq)}</td>
        <td>${d.paths.map((p) => `<code>${esc(p)}</code>`).join(' ')}</td><td>${esc(d.attempts)} · ${esc(d.last_error)}</td>
        <td><button data-action="retry" data-workspace="${esc(w.workspace)}" data-key="${esc(d.key)}">Retry</button>
            <button data-action="discard" data-workspace="${esc(w.workspace)}" data-key="${esc(d.key)}">Discard</button></td></tr>`)
    }
  }
  fill('dead', dead, 'no dead letters')

  const audit = []
  for (const w of ws) for (const e of w.audit || []) audit.push({ ...e, workspace: w.workspace })
  audit.sort((a, b) => b.at - a.at)
  fill('audit', audit.slice(0, 50).map((e) => `<tr><td>${ago(e.at, data.now)}</td><td>${esc(e.workspace)}</td>
    <td>${esc(e.author?.name ?? e.author?.id ?? 'system')}</td><td>${esc(e.kind)}${e.reason ? `: <span class="bad">${esc(e.reason)}</span>` : ''}</td>
    <td>${(e.changes || []).map((c) => `<code>${esc(c.path)}</code> <span class="old">${'old' in c ? esc(JSON.stringify(c.old)) : ''}</span> → <span class="new">${'new' in c ? esc(JSON.stringify(c.new)) : '(removed)'}</span>`).join('<br>')}</td></tr>`), 'no recorded changes')
}

async function load () {
  clearTimeout(timer)
  try {
    const q = watched.length ? { watch: watched.join(',') } : {}
    const res = await fetch(url('/api/admin/console', q), { cache: 'no-store' })
    if (!res.ok) throw new Error(`${res.status} ${(await res.json().catch(() => ({}))).error ?? res.statusText}`)
    render(await res.json())
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1)
  } catch (err) {
    say(`cannot load: ${err.message}`, true)
  }
  if (!paused) timer = setTimeout(load, POLL_MS)
}

async function act (button) {
  const { action, workspace, path, key } = button.dataset
  const ws = enc(workspace)
  const request = {
    release: ['POST', `/api/admin/rooms/${ws}/locks/${enc(path)}/release`, `lock on ${path} in ${workspace} released`],
    retry: ['POST', `/api/workspaces/${ws}/dead-letters/${enc(key)}/retry`, `dead letter of ${workspace} queued again`],
    discard: ['DELETE', `/api/workspaces/${ws}/dead-letters/${enc(key)}`, `dead letter of ${workspace} discarded`]
  }[action]
  if (!request) return
  button.disabled = true
  try {
    const res = await fetch(url(request[1]), { method: request[0] })
    const body = await res.json().catch(() => ({}))
    if (!res.ok) throw new Error(`${res.status} ${body.error ?? ''}`)
    say(request[2])
  } catch (err) {
    say(`${action} failed: ${err.message}`, true)
  } finally {
    await load()
  }
}

document.addEventListener('click', (ev) => {
  const button = ev.target.closest('button[data-action]')
  if (button) act(button)
})
$('#refresh').addEventListener('click', load)
$('#pause').addEventListener('click', () => {
  paused = !paused
  $('#pause').textContent = paused ? 'Resume' : 'Pause'
  $('#pause').setAttribute('aria-pressed', String(paused))
  if (paused) clearTimeout(timer); else load()
})
$('#watch').value = watched.join(',')
$('#watch-form').addEventListener('submit', (ev) => {
  ev.preventDefault()
  watched = $('#watch').value.split(',').map((s) => s.trim()).filter(Boolean)
  load()
})
document.addEventListener('keydown', (ev) => {
  if (ev.target.closest('input, textarea') || ev.ctrlKey || ev.metaKey || ev.altKey) return
  if (ev.key === 'r') load()
  else if (ev.key === 'p') $('#pause').click()
  else if (ev.key === 'w') { ev.preventDefault(); $('#watch').focus() }
})
load()
