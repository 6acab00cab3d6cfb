"""The API's routers, one per concern: tasks, predict, jobs, ops and the web console."""
