"""The tasks the server holds: the resident registry, the head cache and the catalog over the store."""
