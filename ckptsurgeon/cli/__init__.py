"""The ckptsurgeon command line (the only part of the package that imports typer and rich)."""

from .commands import app, entrypoint, main

__all__ = ["app", "entrypoint", "main"]
