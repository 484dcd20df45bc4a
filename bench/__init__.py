"""The sse-twisted benchmark suite (issue 5): ``make bench`` or ``python -m bench --help``."""
