"""preftune's version (its own module: components read it without importing the package's API hook)."""

__version__ = "0.1.0"
