// bridgeToEventBus(): the platform's event names on any object with
// emit(name, payload), so the SPA's existing handlers work unchanged.

export const EVENT_NAMES = Object.freeze({
  participantJoined: 'collaboration:participant:joined',
  participantLeft: 'collaboration:participant:left',
  locked: 'collaboration:data_source:locked',
  unlocked: 'collaboration:data_source:unlocked',
  updated: 'collaboration:data_source:updated',
  broadcast: 'collaboration:operation:broadcast'
})

const participantPayload = (dataSourceId, p, initial) => ({
  dataSourceId,
  userId: p.user_id,
  name: p.name,
  color: p.color,
  role: p.role,
  editing: p.editing ?? null,
  locks: p.locks ?? [],
  initial,
  participant: p
})

const lockPayload = (dataSourceId, r, reason) => ({
  dataSourceId,
  path: r.path,
  userId: r.user_id,
  name: r.name,
  holder: r.holder,
  fence: r.fence,
  expiresAt: r.expires_at,
  mine: Boolean(r.mine),
  ...(reason ? { reason } : {})
})

/**
 * Re-emit a workspace's facts on `bus`. Returns a function that stops it.
 * Participants: others only (not this user). Those already present when the
 * bridge starts or listed in a roster snapshot (at join, after a reconnect)
 * come with `initial: true`; so do locks already held when it starts.
 */
export function bridgeToEventBus (workspace, bus, { dataSourceId = workspace.workspace, includeSelf = false } = {}) {
  if (!bus || typeof bus.emit !== 'function') throw new TypeError('bridgeToEventBus: the bus needs an emit(name, payload) method')
  const emit = (name, payload) => {
    try { bus.emit(name, payload) } catch (err) { queueMicrotask(() => { throw err }) }
  }
  const isSelf = (p) => {
    const me = workspace.user.get()
    return !includeSelf && me !== null && p.user_id === me.id
  }
  const offs = [
    workspace.on('presence', ({ joined, left, message }) => {
      const initial = message.type === 'presence.snapshot'
      for (const p of joined) if (!isSelf(p)) emit(EVENT_NAMES.participantJoined, participantPayload(dataSourceId, p, initial))
      for (const p of left) if (!isSelf(p)) emit(EVENT_NAMES.participantLeft, participantPayload(dataSourceId, p, false))
    }),
    workspace.on('locks', ({ acquired, released, reason }) => {
      for (const r of released) emit(EVENT_NAMES.unlocked, lockPayload(dataSourceId, r, reason))
      for (const r of acquired) emit(EVENT_NAMES.locked, lockPayload(dataSourceId, r))
    }),
    workspace.on('change', ({ changes, local }) => {
      const payload = { dataSourceId, changes, local, paths: changes.map((c) => c.path) }
      if (!local) emit(EVENT_NAMES.broadcast, { ...payload, operation: 'config.update' })
      emit(EVENT_NAMES.updated, { ...payload, config: workspace.config.toJSON() })
    })
  ]
  // What is already there when the bridge starts, as if it had just happened.
  for (const p of workspace.participants.get()) if (!isSelf(p)) emit(EVENT_NAMES.participantJoined, participantPayload(dataSourceId, p, true))
  for (const r of workspace.locks.get()) emit(EVENT_NAMES.locked, lockPayload(dataSourceId, r))
  return () => { for (const off of offs) off() }
}
