"""The wire codec: Yjs sync + awareness messages and our control type, as plain functions over bytes.

It imports nothing of the project (only msgpack), so rooms, extensions and the
app all sit above it; tests drive it with properties and a fuzzer.
"""
