"""The event types, with the platform's names (the SPA's event bus uses the same ones).

Durable types are derived from the workspace's audit trail, written in the
same transaction as the change: published at least once, in order per
workspace. The others are best-effort: emitted by the node that saw the
fact, lost if that node dies before publishing them.
"""

from __future__ import annotations

PARTICIPANT_JOINED = "collaboration:participant:joined"
PARTICIPANT_LEFT = "collaboration:participant:left"
PARTICIPANT_FOCUS = "collaboration:participant:focus_changed"
LOCKED = "collaboration:data_source:locked"
UNLOCKED = "collaboration:data_source:unlocked"  # data.reason: released | expired | forced | lost
UPDATED = "collaboration:data_source:updated"
REJECTED = "collaboration:data_source:change_rejected"
SEEDED = "collaboration:data_source:seeded"
FORWARDED = "collaboration:data_source:forwarded"
FORWARD_FAILED = "collaboration:data_source:forward_failed"
FORWARD_DEAD = "collaboration:data_source:forward_dead_lettered"
WORKSPACE_OPENED = "collaboration:workspace:opened"
WORKSPACE_EVICTED = "collaboration:workspace:evicted"

# Derived from the durable log (audit trail and forward state).
DURABLE = frozenset({UPDATED, REJECTED, SEEDED, FORWARDED, FORWARD_FAILED, FORWARD_DEAD})
BEST_EFFORT = frozenset(
    {PARTICIPANT_JOINED, PARTICIPANT_LEFT, PARTICIPANT_FOCUS, LOCKED, UNLOCKED, WORKSPACE_OPENED, WORKSPACE_EVICTED}
)
ALL = DURABLE | BEST_EFFORT

UNLOCK_REASONS = ("released", "expired", "forced", "lost")
