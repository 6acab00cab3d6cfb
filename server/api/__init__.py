"""The HTTP API: typed dependencies, middleware, the OpenAPI schema as served, and the routes."""
