// Net changes of the `config` map from Yjs deep events: dotted paths with old and
// new values, the shape the event bus and the UI want.

const plain = (value) => (value !== null && typeof value === 'object' && typeof value.toJSON === 'function' ? value.toJSON() : value)

/** [{path, action, oldValue, newValue}] for the events of one transaction on `config`. */
export function configChanges (events) {
  const out = []
  for (const event of events) {
    const base = event.path.map(String)
    const keys = event.changes && event.changes.keys
    if (keys && keys.size > 0) {
      for (const [key, change] of keys) {
        const path = [...base, key].join('.')
        out.push({
          path,
          action: change.action,
          oldValue: plain(change.oldValue),
          newValue: change.action === 'delete' ? undefined : plain(event.target.get(key))
        })
      }
    } else if (base.length > 0) {
      out.push({ path: base.join('.'), action: 'update', oldValue: undefined, newValue: plain(event.target) })
    }
  }
  return out
}

/** Split a dotted config path, refusing empty segments. */
export function splitPath (path) {
  const parts = typeof path === 'string' ? path.split('.') : []
  if (parts.length === 0 || parts.some((p) => p === '')) throw new TypeError(`not a config path: ${JSON.stringify(path)}`)
  return parts
}
