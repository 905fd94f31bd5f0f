"""The worker: the agent on a GPU node and the built-in runtimes it runs (worker/runtimes)."""
