"""datasource-collab: real-time collaboration server for data-source configuration."""

__version__ = "0.1.0"
