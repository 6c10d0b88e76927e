"""loratune's version, in one place (the package, manifests and GGUF files record it)."""

__version__ = "0.1.0"
