"""Add-on preferences: backend URL, token, and the optional local backend launcher."""

from __future__ import annotations

import os

import bpy
from bpy.props import FloatProperty, StringProperty

from .client import BackendClient, BackendError, is_loopback
from .connection import CONNECTION
from .launcher import LAUNCHER

ADDON_ID = __package__


class FlexiActPreferences(bpy.types.AddonPreferences):
    """Where the backend is and how to reach it."""

    bl_idname = ADDON_ID

    backend_url: StringProperty(name="Backend URL", default="http://127.0.0.1:8765")
    token: StringProperty(name="Token", subtype="PASSWORD",
                          description="The token the backend was started with (--token); empty for none")
    timeout_s: FloatProperty(name="Timeout (s)", default=30.0, min=1.0, max=600.0)
    launcher_command: StringProperty(
        name="Local Backend Command",
        description="A command line that serves the backend on the URL above, e.g. "
                    "'/path/to/python -m flexiact_backend.service --tiny --port 8765'")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "backend_url")
        layout.prop(self, "token")
        layout.prop(self, "timeout_s")
        row = layout.row()
        row.operator("flexiact.test_connection", icon="LINKED")
        if CONNECTION.summary:
            row.label(text=CONNECTION.summary)
        if not is_loopback(self.backend_url) and not bpy.app.online_access:
            layout.label(text="A remote backend needs Online Access (Preferences › System › Network)",
                         icon="ERROR")
        box = layout.box()
        box.label(text="Local backend", icon="CONSOLE")
        box.prop(self, "launcher_command", text="Command")
        row = box.row()
        row.operator("flexiact.backend_start", icon="PLAY")
        row.operator("flexiact.backend_stop", icon="PAUSE")
        box.label(text=("Running" if LAUNCHER.running() else "Stopped")
                  + (f" · log: {LAUNCHER.log_path}" if LAUNCHER.log_path else ""))


def get_prefs(context: bpy.types.Context | None = None) -> FlexiActPreferences:
    """This add-on's preferences (the add-on is registered under `__package__`)."""
    context = context or bpy.context
    return context.preferences.addons[ADDON_ID].preferences


def make_client(context: bpy.types.Context | None = None, timeout: float | None = None) -> BackendClient:
    """A client for the configured backend; a remote one only when Blender allows online access."""
    prefs = get_prefs(context)
    if not is_loopback(prefs.backend_url) and not bpy.app.online_access:
        raise BackendError(f"{prefs.backend_url} is not on this machine and Blender's Online Access is off: "
                           "turn it on in Preferences › System › Network, or use a local backend.",
                           "offline")
    return BackendClient(prefs.backend_url, prefs.token, timeout or prefs.timeout_s)


def user_dir() -> str:
    """The extension's own writable folder (never the add-on folder)."""
    return bpy.utils.extension_path_user(ADDON_ID, path="", create=True)


def output_dir() -> str:
    """Where results go: `//flexiact/` beside the saved .blend, else the extension's user folder."""
    folder = bpy.path.abspath("//flexiact") if bpy.data.filepath else os.path.join(user_dir(), "results")
    os.makedirs(folder, exist_ok=True)
    return folder


def stored_path(path: str) -> str:
    """A path as saved in the .blend: relative to it when it is saved, so the project can move."""
    return bpy.path.relpath(path) if bpy.data.filepath else path


CLASSES = (FlexiActPreferences,)
