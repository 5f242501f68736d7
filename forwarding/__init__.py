"""Validation, durable outbox, forwarding to the data-source backend, audit trail.

* :mod:`forwarding.model` -- the default pydantic model of a data-source configuration;
* :mod:`forwarding.validation` -- the update guard that refuses invalid configurations;
* :mod:`forwarding.forwarder` -- ordered, at-least-once delivery of the outbox over HTTP;
* :mod:`forwarding.extension` -- wires all of it (and seeding, the audit API) into the app.

See docs/forwarding.md and docs/backend-contract.md.
"""
