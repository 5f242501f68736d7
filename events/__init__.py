"""Events for the platform: CloudEvents published to a Redis Stream, webhooks and SSE (docs/events.md)."""
