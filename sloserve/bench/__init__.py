"""Load generator, metrics and reports for any OpenAI-compatible endpoint (imports no engine code)."""
