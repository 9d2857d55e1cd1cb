"""Add-on preferences: backend URL, token, and the optional local backend launcher."""

from __future__ import annotations

import functools
import os
import shlex
import shutil

import bpy
from bpy.props import FloatProperty, StringProperty

from .client import BackendClient, BackendError, is_loopback, url_port, with_scheme
from .connection import CONNECTION
from .launcher import EXAMPLE_COMMAND, LAUNCHER

ADDON_ID = __package__


def _url_changed(self: "FlexiActPreferences", _context: bpy.types.Context) -> None:
    """A URL typed without a scheme gets http://; the old backend's state no longer holds."""
    if self.backend_url != with_scheme(self.backend_url):
        self.backend_url = with_scheme(self.backend_url)  # runs this again, with nothing left to change
        return
    CONNECTION.forget()


class FlexiActPreferences(bpy.types.AddonPreferences):
    """Where the backend is and how to reach it."""

    bl_idname = ADDON_ID

    backend_url: StringProperty(name="Backend URL", default="http://127.0.0.1:8765", update=_url_changed,
                                description="Where the FlexiAct backend listens (`flexiact-backend serve` prints "
                                            "it); http:// is added when no scheme is given")
    token: StringProperty(name="Token", subtype="PASSWORD",
                          description="The token the backend was started with (--token); empty for none")
    timeout_s: FloatProperty(name="Timeout (s)", default=30.0, min=1.0, max=600.0,
                             description="How long one request may wait for the backend before it counts as failed")
    unsaved_dir: StringProperty(
        name="Results of Unsaved Files", subtype="DIR_PATH", default=os.path.join("~", "FlexiAct"),
        description="Where captures and results go while the .blend is not saved yet; the first save moves "
                    "them next to the .blend (//flexiact/)")
    backend_env: StringProperty(
        name="Backend Environment", subtype="DIR_PATH",
        description="The Python environment flexiact-backend is installed in (after `make setup`, the checkout's "
                    ".venv folder): Start runs its flexiact-backend on the Backend URL's port")
    launcher_command: StringProperty(
        name="Local Backend Command",
        description=f"A whole command line instead, e.g. '{EXAMPLE_COMMAND}' (it must serve the Backend URL)")

    def draw(self, context: bpy.types.Context) -> None:
        layout = self.layout
        layout.prop(self, "backend_url")
        layout.prop(self, "token")
        layout.prop(self, "timeout_s")
        layout.prop(self, "unsaved_dir")
        row = layout.row()
        row.operator("flexiact.test_connection", icon="LINKED")
        if CONNECTION.summary:
            row.label(text=CONNECTION.summary)
        if not is_loopback(self.backend_url) and not bpy.app.online_access:
            layout.label(text="A remote backend needs Online Access (Preferences › System › Network)",
                         icon="ERROR")
        box = layout.box()
        box.label(text="Local backend", icon="CONSOLE")
        box.prop(self, "backend_env")
        box.prop(self, "launcher_command", text="Command")
        command = start_command()
        box.label(text=f"Start runs: {command}" if command else NO_CLI, icon="CONSOLE" if command else "ERROR")
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


NO_CLI = ("flexiact-backend was not found: set the Backend Environment (the .venv of `make setup`) or a command "
          "in Preferences › Add-ons › FlexiAct")


@functools.lru_cache(maxsize=8)
def find_cli(env: str) -> str | None:
    """flexiact-backend in the environment `env` (bin/ or Scripts/), else on Blender's PATH; looked up once per
    environment (panels draw without I/O)."""
    if env:
        root = os.path.abspath(os.path.expanduser(bpy.path.abspath(env)))
        for name in ("bin/flexiact-backend", "Scripts/flexiact-backend.exe"):
            path = os.path.join(root, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
        return None
    return shutil.which("flexiact-backend")


def start_command() -> str:
    """The command that starts a backend on this machine: the preferences' own, else the found CLI serving the
    tiny model on the Backend URL's port; "" when there is none."""
    prefs = get_prefs()
    configured = prefs.launcher_command.strip()
    if configured:
        return configured
    cli = find_cli(prefs.backend_env.strip())
    if cli is None:
        return ""
    return f"{shlex.quote(cli)} serve --tiny --port {url_port(prefs.backend_url)}"


def user_dir() -> str:
    """The extension's own writable folder (never the add-on folder)."""
    return bpy.utils.extension_path_user(ADDON_ID, path="", create=True)


def unsaved_dir() -> str:
    """The preferences' folder for the results of a .blend not saved yet."""
    return os.path.abspath(os.path.expanduser(bpy.path.abspath(get_prefs().unsaved_dir)))


def output_dir() -> str:
    """Where results go: `//flexiact/` beside the saved .blend, else the folder chosen in the preferences."""
    folder = bpy.path.abspath("//flexiact") if bpy.data.filepath else unsaved_dir()
    os.makedirs(folder, exist_ok=True)
    return folder


def stored_path(path: str) -> str:
    """A path as saved in the .blend: relative to it when it is saved, so the project can move."""
    return bpy.path.relpath(path) if bpy.data.filepath else path


CLASSES = (FlexiActPreferences,)
