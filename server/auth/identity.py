"""Who is asking: the API key's tenant and role, or an anonymous caller of the default tenant.

401 when credentials are needed but none (or a malformed header) were sent, 403 when the key is unknown
or its role may not do what was asked, 429 when the key spent its rate limit. A request carrying a valid
key always acts in that key's tenant, also on endpoints that need no key. On a server with keys, callers
without a key are rate-limited per client address (the address uvicorn reports: behind a proxy, run
uvicorn with `--forwarded-allow-ips` so it is the caller's, not the proxy's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from server.auth.keys import KeyRing, Role
from server.auth.ratelimit import RateLimiter
from server.errors import Forbidden, Unauthorized
from server.ids import DEFAULT_TENANT

Need = Literal["admin", "predict", "read"]


@dataclass(frozen=True)
class Identity:
    tenant: str
    role: Role | None  # None: no key was sent
    key_id: str | None


ANONYMOUS = Identity(DEFAULT_TENANT, None, None)


class Authenticator:
    def __init__(
        self,
        keys: KeyRing,
        limiter: RateLimiter,
        predict_requires_key: bool,
        anonymous_rate: tuple[float, int] = (0.0, 1),
    ) -> None:
        self.keys, self.limiter, self.predict_requires_key = keys, limiter, predict_requires_key
        self.anonymous_rate_per_s, self.anonymous_burst = anonymous_rate

    def identify(self, authorization: str | None, need: Need, client: str = "unknown") -> Identity:
        """The caller's identity for an action needing `need`; raises Unauthorized/Forbidden/RateLimited.

        `client` is the caller's address, the rate-limit bucket of requests without a key."""
        if not self.keys.enabled:  # an open server (loopback only): everyone administers the default tenant
            return ANONYMOUS
        if not authorization or not authorization.strip():
            if need == "admin" or self.predict_requires_key:
                raise Unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'")
            self._limit_anonymous(client)
            return ANONYMOUS
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        record = self.keys.lookup(token)
        if record is None:
            raise Forbidden("the API key is not valid for this server")
        if need == "admin" and record.role != "admin":
            raise Forbidden(f"key {record.id!r} may only predict; uploads and deletes need an admin key")
        self.limiter.take(record.id, record.rate_per_s, record.burst)
        return Identity(record.tenant, record.role, record.id)

    def _limit_anonymous(self, client: str) -> None:
        self.limiter.take(f"anonymous@{client}", self.anonymous_rate_per_s, self.anonymous_burst)
