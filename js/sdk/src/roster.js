// The participant roster: a presence.snapshot, then presence.diff messages
// applied in order (docs/presence.md). Pure functions, so they unit-test alone.

/** A new roster (Map user_id -> participant) after one presence message. */
export function applyPresence (roster, message) {
  if (message.type === 'presence.snapshot') {
    return new Map((message.participants ?? []).map((p) => [p.user_id, p]))
  }
  if (message.type !== 'presence.diff') return roster
  const next = new Map(roster)
  for (const p of message.leaves ?? []) next.delete(p.user_id)
  for (const p of message.joins ?? []) next.set(p.user_id, p)
  for (const p of message.updates ?? []) next.set(p.user_id, p)
  return next
}

/** The roster as a list, earliest joined first (ties by user id). */
export function participantList (roster) {
  return [...roster.values()].sort((a, b) => (a.joined_at ?? 0) - (b.joined_at ?? 0) || String(a.user_id).localeCompare(String(b.user_id)))
}

/** Who arrived and who left between two rosters. */
export function rosterChanges (before, after) {
  const joined = []
  const left = []
  for (const [id, p] of after) if (!before.has(id)) joined.push(p)
  for (const [id, p] of before) if (!after.has(id)) left.push(p)
  return { joined, left }
}
