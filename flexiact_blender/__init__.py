"""FlexiAct for Blender: transfer an action from a reference clip onto a target frame via a FlexiAct backend.

The extension's metadata lives in `blender_manifest.toml`; this module only registers the parts.
"""

from __future__ import annotations

import bpy

from . import connection, jobs, operators, panels, preferences, properties
from .launcher import LAUNCHER

_CLASSES = (*preferences.CLASSES, *operators.CLASSES, *panels.CLASSES)


def register() -> None:
    properties.register()
    for cls in _CLASSES:
        bpy.utils.register_class(cls)
    jobs.register()
    connection.start_heartbeat(lambda timeout: preferences.make_client(timeout=timeout))


def unregister() -> None:
    connection.stop_heartbeat()
    jobs.unregister()
    LAUNCHER.stop()
    for cls in reversed(_CLASSES):
        bpy.utils.unregister_class(cls)
    properties.unregister()
