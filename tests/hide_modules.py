"""Run the CLI as if some packages were not installed: `python hide_modules.py MOD[,MOD...] CLI-ARGS...`.

Each finder on `sys.meta_path` is wrapped so the named modules (and their submodules) are not found, exactly as
when they are absent; their dist-info stays visible, as after a partial uninstall. A real subprocess runs the
real CLI: nothing in the backend is patched.
"""

from __future__ import annotations

import importlib.abc
import sys

HIDDEN = tuple(m for m in sys.argv[1].split(",") if m)


class Hide(importlib.abc.MetaPathFinder):
    def __init__(self, inner: object) -> None:
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if any(name == m or name.startswith(m + ".") for m in HIDDEN):
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.inner, "find_distributions", None)
        return find(*args, **kwargs) if find else iter(())

    def invalidate_caches(self) -> None:
        getattr(self.inner, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [Hide(f) for f in sys.meta_path]

from flexiact_backend.tools.cli import main  # noqa: E402  (after the finders are wrapped)

raise SystemExit(main(sys.argv[2:]))
