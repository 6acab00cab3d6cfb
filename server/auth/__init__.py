"""Who is asking: API keys and their tenants and roles, the caller's identity, per-key rate limits."""
