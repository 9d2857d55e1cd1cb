"""The HTTP service: FastAPI app, durable SQLite job queue, content-addressed file store, device workers."""
