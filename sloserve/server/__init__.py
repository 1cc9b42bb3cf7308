"""The OpenAI-compatible HTTP server: routes, admission, metrics and the `serve` command."""
