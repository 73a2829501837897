"""fediblog: a blog whose posts live in the fediverse."""

__version__ = "0.1.0"
