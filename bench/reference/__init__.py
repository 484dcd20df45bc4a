"""The reference server bench/ measures sse-twisted against (issue 11)."""
