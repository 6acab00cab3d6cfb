"""What the API's handlers reach through the app: settings, metrics, the authenticator and, while the
server runs, the runtime and the batcher (`AppState`, kept as `app.state.recast`)."""

from __future__ import annotations

from server.auth.identity import Authenticator
from server.auth.keys import KeyRing
from server.auth.ratelimit import RateLimiter
from server.errors import NotReady
from server.metrics import Metrics
from server.runtime import Runtime
from server.serving.batcher import Batcher
from server.settings import Settings


class AppState:
    """What the routes need; `runtime` and `batcher` exist between start-up and shutdown only."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.auth = Authenticator(
            KeyRing(settings.keys, settings.keys_file),
            RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst),
            settings.predict_requires_key,
            (settings.anonymous_rate_limit_per_s, settings.anonymous_rate_limit_burst),
        )
        self.runtime: Runtime | None = None
        self.batcher: Batcher | None = None
        self.ready = False

    def require(self) -> tuple[Runtime, Batcher]:
        if not self.ready or self.runtime is None or self.batcher is None or not self.batcher.healthy:
            raise NotReady("the server is starting or stopping", retry_after=2)
        return self.runtime, self.batcher
