// Yjs as the oracle for the surrogate-pair cases of tests/test_textsplit.py.
//
//   node js/textsplit_cases.mjs   -> JSON: [{name, updates: [hex...], state: hex, text}]
//
// Each case is a short session of stock Yjs documents; `updates` are what the
// server would receive, in order; `state` and `text` are what a Yjs document
// that applied them holds (encodeStateAsUpdate / toString).
import * as Y from 'yjs'

const hex = (u) => Buffer.from(u).toString('hex')

function session (name, script) {
  const docs = []
  const updates = []
  const make = (id) => {
    const d = new Y.Doc()
    d.clientID = id
    d.on('update', (u, origin) => { if (origin !== 'sync') updates.push(u) })
    docs.push(d)
    return d
  }
  const sync = (a, b) => Y.applyUpdate(b, Y.encodeStateAsUpdate(a, Y.encodeStateVector(b)), 'sync')
  script({ make, sync })
  const oracle = new Y.Doc()
  for (const u of updates) Y.applyUpdate(oracle, u)
  return { name, updates: updates.map(hex), state: hex(Y.encodeStateAsUpdate(oracle)), text: oracle.getText('notes').toString() }
}

const cases = [
  session('delete the second half', ({ make }) => {
    const a = make(1)
    const t = a.getText('notes')
    t.insert(0, 'a🙂b')
    t.delete(2, 1)
  }),
  session('delete the first half', ({ make }) => {
    const a = make(1)
    const t = a.getText('notes')
    t.insert(0, 'x🙂🙂y')
    t.delete(1, 1)
  }),
  session('insert between the halves by another client', ({ make, sync }) => {
    const a = make(1)
    const b = make(2)
    a.getText('notes').insert(0, 'a😀b')
    sync(a, b)
    b.getText('notes').insert(2, 'Z')
  }),
  session('format a range that starts inside a pair', ({ make, sync }) => {
    const a = make(1)
    const b = make(2)
    a.getText('notes').insert(0, 'ab👍🏽cd')
    sync(a, b)
    b.getText('notes').format(3, 3, { bold: true })
  }),
  session('one update inserts and cuts', ({ make }) => {
    const a = make(1)
    a.transact(() => {
      const t = a.getText('notes')
      t.insert(0, 'q👩‍👩‍👧r')
      t.delete(2, 3)
    })
  }),
  session('delete across two pairs', ({ make, sync }) => {
    const a = make(1)
    const b = make(2)
    a.getText('notes').insert(0, '🙂🙂🙂')
    sync(a, b)
    b.getText('notes').delete(1, 4)
  }),
  session('combining marks and BMP only', ({ make }) => {
    const a = make(1)
    const t = a.getText('notes')
    t.insert(0, 'e\u0301日本ü')
    t.delete(1, 2)
  })
]
process.stdout.write(JSON.stringify(cases))
