"""The HTTP service: FastAPI app, durable SQLite job queue, content-addressed file store, device workers."""

from .cli import add_bench_serve, add_gc_command, add_serve_command

__all__ = ["add_bench_serve", "add_gc_command", "add_serve_command"]
