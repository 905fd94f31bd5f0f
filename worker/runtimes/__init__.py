"""The built-in runtimes the worker agent starts: train_lm (training) and serve_lm (inference)."""
