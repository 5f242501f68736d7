// Lock state of a workspace from lock.state snapshots and lock.* broadcasts
// (docs/locks.md). Pure functions: the state is a Map path -> lock record.

export const LOCK_BROADCASTS = new Set(['lock.acquired', 'lock.released', 'lock.expired', 'lock.lost'])

const RECORD_FIELDS = ['path', 'holder', 'user_id', 'name', 'fence', 'expires_at']

function record (message) {
  const out = {}
  for (const key of RECORD_FIELDS) if (key in message) out[key] = message[key]
  return out
}

/** A new lock map after one lock message, or the same map when nothing changed. */
export function applyLockMessage (locks, message) {
  switch (message.type) {
    case 'lock.state':
      return new Map((message.locks ?? []).map((r) => [r.path, record(r)]))
    case 'lock.acquired': {
      const next = new Map(locks)
      next.set(message.path, record(message))
      return next
    }
    case 'lock.released':
    case 'lock.expired':
    case 'lock.lost': {
      const held = locks.get(message.path)
      // An end that names another lease (an older fence, another holder) changes nothing.
      if (!held || (message.holder !== undefined && held.holder !== message.holder) ||
          (message.fence !== undefined && held.fence !== undefined && held.fence !== message.fence)) return locks
      const next = new Map(locks)
      next.delete(message.path)
      return next
    }
    default:
      return locks
  }
}

/** Leases that appeared and that ended between two lock maps. */
export function lockChanges (before, after) {
  const acquired = []
  const released = []
  for (const [path, r] of after) {
    const old = before.get(path)
    if (!old || old.holder !== r.holder || old.fence !== r.fence) {
      if (old) released.push(old)
      acquired.push(r)
    }
  }
  for (const [path, r] of before) if (!after.has(path)) released.push(r)
  return { acquired, released }
}

/** Whether lock path `a` covers `b` (equal, or an ancestor at a dot boundary). */
export function covers (a, b) {
  return a === b || b.startsWith(a + '.')
}
