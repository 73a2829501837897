"""The HTTP edge: routes only. Each module turns requests into service calls."""
