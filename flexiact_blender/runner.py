"""Worker threads for HTTP and the one timer that hands their results to Blender's main thread.

It knows nothing about jobs: callers give it a function to run off the main thread and a callback to run on
it. bpy is only touched from the callbacks. In background mode (no event loop, timers never fire) callers pass
`wait=True` and both run at once.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Any, Callable, TypeVar

import bpy

from .client import BackendError

TICK_S = 0.2
BUDGET_S = 0.05
T = TypeVar("T")

_callbacks: queue.Queue[Callable[[], Any]] = queue.Queue()
_lock = threading.Lock()
_threads = 0


def post(callback: Callable[[], Any]) -> None:
    """Run `callback` on the main thread at the next tick (callable from any thread)."""
    _callbacks.put(callback)


def spawn(fn: Callable[[], None], name: str) -> None:
    """Run `fn` in a daemon thread; the timer keeps ticking until it returns and its posts are handled."""
    global _threads

    def body() -> None:
        global _threads
        try:
            fn()
        finally:
            with _lock:
                _threads -= 1

    with _lock:
        _threads += 1
    threading.Thread(target=body, name=name, daemon=True).start()
    ensure_timer()


def call(fn: Callable[[], T], done: Callable[[T | None, BackendError | None], Any], wait: bool = False) -> Any:
    """`fn()` off the main thread, then `done(result, error)` on it.

    wait=True (background mode, or a caller that needs the answer) runs both now and returns `done`'s value;
    otherwise it returns None at once.
    """
    if wait:
        try:
            result = fn()
        except BackendError as exc:
            return done(None, exc)
        return done(result, None)

    def work() -> None:
        try:
            result, error = fn(), None
        except BackendError as exc:
            result, error = None, exc
        except Exception as exc:  # a bug must still reach the panel, not die silently in a thread
            result, error = None, BackendError(f"Unexpected error: {exc!r}", "internal")
        post(lambda: done(result, error))

    spawn(work, "flexiact-call")
    return None


def busy() -> bool:
    """True while a thread runs or a callback waits for the main thread."""
    with _lock:
        return _threads > 0 or not _callbacks.empty()


def timer_tick() -> float | None:
    """Run queued callbacks for at most BUDGET_S; keep ticking while anything is in flight."""
    deadline = time.perf_counter() + BUDGET_S
    while time.perf_counter() < deadline:
        try:
            callback = _callbacks.get_nowait()
        except queue.Empty:
            break
        try:
            callback()
        except Exception:  # one failing callback must not stop the timer that every job depends on
            traceback.print_exc()
    redraw()
    return TICK_S if busy() else None


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.register(timer_tick, first_interval=TICK_S)


def remove_timer() -> None:
    if bpy.app.timers.is_registered(timer_tick):
        bpy.app.timers.unregister(timer_tick)


def clear() -> None:
    """Drop callbacks not yet run (a new file is loaded: they belong to the old one)."""
    while not _callbacks.empty():
        _callbacks.get_nowait()


def redraw() -> None:
    """Ask FlexiAct's sidebars to redraw, so progress moves without the mouse moving."""
    wm = bpy.context.window_manager
    for window in wm.windows if wm else ():
        for area in window.screen.areas:
            if area.type in {"VIEW_3D", "SEQUENCE_EDITOR", "PREFERENCES"}:
                area.tag_redraw()
