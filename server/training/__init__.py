"""Training jobs: requests parsed, queued fairly, run in worker processes, recorded and published."""
