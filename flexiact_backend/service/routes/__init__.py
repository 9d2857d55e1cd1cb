"""The HTTP routes, one `APIRouter` per resource; `app.create_app` mounts them under /v1."""
