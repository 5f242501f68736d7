"""The reference data-source backend (see refbackend/app.py and docs/backend-contract.md)."""
