"""Bearer API keys: 401 when no usable credentials are sent, 403 when the key is not one of ours."""

from __future__ import annotations

import hmac

from server.errors import Forbidden, Unauthorized


def check_bearer(authorization: str | None, keys: tuple[str, ...]) -> None:
    """Raise unless `authorization` is `Bearer <key>` for one of `keys` (all compared, constant time)."""
    if authorization is None or not authorization.strip():
        raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    supplied = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(supplied, key.encode())
    if not matched:
        raise Forbidden("the API key is not valid for this server")
