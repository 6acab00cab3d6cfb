"""Durable task stores behind one interface: a local directory (default) or PostgreSQL (several replicas)."""

from __future__ import annotations

from server.stores.base import Change, StoredTask, TaskStore, open_store

__all__ = ["Change", "StoredTask", "TaskStore", "open_store"]
