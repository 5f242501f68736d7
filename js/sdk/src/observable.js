// A minimal observable value: `get()` for the current value and `subscribe(fn)`
// that calls fn at once and on every change (the Svelte store contract; also
// fits React's useSyncExternalStore, whose getSnapshot is `get`).

export function createObservable (initial, equals = Object.is) {
  let value = initial
  const listeners = new Set()
  return {
    get: () => value,
    subscribe (fn) {
      listeners.add(fn)
      fn(value)
      return () => listeners.delete(fn)
    },
    /** @internal the owner's setter; not part of the public type. */
    set (next) {
      if (equals(value, next)) return
      value = next
      for (const fn of [...listeners]) {
        try { fn(value) } catch (err) { queueMicrotask(() => { throw err }) }
      }
    }
  }
}

/** The public face of an observable: no setter. */
export function readonly (observable) {
  return { get: observable.get, subscribe: observable.subscribe }
}
