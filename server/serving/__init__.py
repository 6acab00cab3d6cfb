"""Answering predictions: cross-task dynamic batching and the one forward for many tasks."""
