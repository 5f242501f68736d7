// Participant-awareness panel: plain browser APIs, no build step.
//
// Reads the workspace id from the page path (/workspaces/{id}) and follows the
// server's roster over Server-Sent Events: one `presence.snapshot`, then
// `presence.diff` events {joins, leaves, updates}. A gap in `seq` (or a dropped
// stream) reopens the stream, which starts again from a snapshot. The page's
// query string is passed on, so whatever identifies the viewer (a token, or
// the development ?user=) reaches the server.
'use strict'

;(function () {
  const workspace = decodeURIComponent(location.pathname.replace(/\/+$/, '').split('/').pop())
  const feedLimit = 50
  const roster = new Map() // user_id -> participant
  let seq = null
  let source = null
  let hadSnapshot = false

  const $ = (id) => document.getElementById(id)
  document.title = `Participants · ${workspace}`
  $('workspace').textContent = workspace

  function el (tag, attrs, ...children) {
    const node = document.createElement(tag)
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === 'class') node.className = value
      else if (key.startsWith('data-')) node.setAttribute(key, value)
      else node[key] = value
    }
    for (const child of children) {
      if (child == null) continue
      node.append(child instanceof Node ? child : document.createTextNode(String(child)))
    }
    return node
  }

  function initials (name) {
    const parts = String(name || '?').trim().split(/[\s._@-]+/).filter(Boolean)
    const letters = parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : (parts[0] || '?').slice(0, 2)
    return letters.toUpperCase()
  }

  function clock (seconds) {
    return new Date(seconds * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' })
  }

  function ago (seconds) {
    const delta = Math.max(0, Date.now() / 1000 - seconds)
    if (delta < 45) return 'active now'
    if (delta < 3600) return `active ${Math.round(delta / 60)} min ago`
    return `active ${Math.round(delta / 3600)} h ago`
  }

  function lockIcon () {
    const ns = 'http://www.w3.org/2000/svg'
    const svg = document.createElementNS(ns, 'svg')
    svg.setAttribute('viewBox', '0 0 16 16')
    svg.setAttribute('width', '11')
    svg.setAttribute('height', '11')
    svg.setAttribute('aria-hidden', 'true')
    const body = document.createElementNS(ns, 'rect')
    for (const [k, v] of Object.entries({ x: 2.5, y: 7, width: 11, height: 8, rx: 1.5, fill: 'currentColor' })) body.setAttribute(k, v)
    const shackle = document.createElementNS(ns, 'path')
    shackle.setAttribute('d', 'M5 7V5a3 3 0 0 1 6 0v2')
    shackle.setAttribute('fill', 'none')
    shackle.setAttribute('stroke', 'currentColor')
    shackle.setAttribute('stroke-width', '1.8')
    svg.append(body, shackle)
    return svg
  }

  function card (p, isNew) {
    const avatar = el('div', { class: 'avatar', title: p.name }, initials(p.name), el('span', { class: 'dot' }))
    avatar.style.background = /^#[0-9a-fA-F]{3,8}$/.test(p.color) ? p.color : '#667085'
    const badges = []
    if (p.role && p.role !== 'editor') badges.push(el('span', { class: 'badge' }, p.role))
    if (p.connections > 1) badges.push(el('span', { class: 'badge', 'data-connections': String(p.connections) }, `${p.connections} tabs`))
    const editing = p.editing
      ? el('div', { class: 'editing' }, 'editing ', el('code', {}, p.editing))
      : el('div', { class: 'editing idle' }, 'viewing')
    const locks = (p.locks || []).length
      ? el('div', { class: 'locks' }, ...p.locks.map((path) => el('span', { class: 'lock', title: `${p.name} holds the lock on ${path}`, 'data-lock': path }, lockIcon(), path)))
      : null
    const nodes = (p.nodes || [p.node]).join(', ')
    const meta = el('div', { class: 'meta' }, `here since ${clock(p.joined_at)} · `, el('span', { class: 'ago', 'data-last-active': String(p.last_active) }, ago(p.last_active)), ` · node ${nodes}`)
    return el('li', { class: isNew ? 'participant joined' : 'participant', 'data-user-id': p.user_id, 'data-editing': p.editing || '' },
      avatar,
      el('div', {}, el('div', { class: 'who' }, el('span', { class: 'name' }, p.name), ...badges), editing, locks, meta))
  }

  function render (joined) {
    const list = $('participants')
    const people = [...roster.values()].sort((a, b) => a.joined_at - b.joined_at || a.user_id.localeCompare(b.user_id))
    list.replaceChildren(...people.map((p) => card(p, joined && joined.has(p.user_id))))
    $('empty').hidden = people.length > 0
    $('count').textContent = `${people.length} online`
  }

  function note (kind, p, text) {
    const feed = $('feed')
    const item = el('li', { 'data-kind': kind, 'data-user-id': p.user_id },
      el('time', {}, clock(Date.now() / 1000)), el('span', { class: 'what' }, text))
    feed.prepend(item)
    while (feed.children.length > feedLimit) feed.lastChild.remove()
  }

  function status (state, text) {
    document.body.dataset.status = state
    $('status').textContent = text
  }

  function onSnapshot (event) {
    const message = JSON.parse(event.data)
    const fresh = new Map(message.participants.map((p) => [p.user_id, p]))
    if (hadSnapshot) {
      // After a reconnect: report what changed while we were away.
      for (const [id, p] of fresh) if (!roster.has(id)) note('join', p, `${p.name} joined`)
      for (const [id, p] of roster) if (!fresh.has(id)) note('leave', p, `${p.name} left`)
    }
    hadSnapshot = true
    roster.clear()
    for (const [id, p] of fresh) roster.set(id, p)
    seq = message.seq
    status('live', 'live')
    render()
  }

  function onDiff (event) {
    const message = JSON.parse(event.data)
    if (seq !== null && message.seq !== seq + 1) {
      reopen() // missed something: start again from a snapshot
      return
    }
    seq = message.seq
    for (const p of message.joins) { roster.set(p.user_id, p); note('join', p, `${p.name} joined`) }
    for (const p of message.leaves) { roster.delete(p.user_id); note('leave', p, `${p.name} left`) }
    for (const p of message.updates) roster.set(p.user_id, p)
    render(new Set(message.joins.map((p) => p.user_id)))
  }

  function open () {
    const url = `/api/workspaces/${encodeURIComponent(workspace)}/participants/events${location.search}`
    source = new EventSource(url)
    source.addEventListener('presence.snapshot', onSnapshot)
    source.addEventListener('presence.diff', onDiff)
    source.onopen = () => status('connecting', 'syncing…')
    source.onerror = () => {
      seq = null
      status('reconnecting', 'reconnecting…')
      // EventSource retries by itself unless the server refused the stream.
      if (source.readyState === EventSource.CLOSED) setTimeout(reopen, 2000)
    }
  }

  function reopen () {
    if (source) source.close()
    seq = null
    open()
  }

  setInterval(() => {
    for (const span of document.querySelectorAll('.ago')) span.textContent = ago(Number(span.dataset.lastActive))
  }, 15000)
  open()
})()
