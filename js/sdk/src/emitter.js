// Named events with listeners that can't break the emitter (a throwing
// listener is reported asynchronously, the others still run).

export class Emitter {
  constructor () {
    this._listeners = new Map()
  }

  on (name, fn) {
    let set = this._listeners.get(name)
    if (!set) this._listeners.set(name, (set = new Set()))
    set.add(fn)
    return () => this.off(name, fn)
  }

  once (name, fn) {
    const off = this.on(name, (payload) => { off(); fn(payload) })
    return off
  }

  off (name, fn) {
    const set = this._listeners.get(name)
    if (set) set.delete(fn)
  }

  emit (name, payload) {
    const set = this._listeners.get(name)
    if (!set) return
    for (const fn of [...set]) {
      try { fn(payload) } catch (err) { queueMicrotask(() => { throw err }) }
    }
  }
}
