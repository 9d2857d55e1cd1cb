"""Where results live across saves: made in an unsaved file they move beside the .blend when it is first saved.

Blender remaps the paths it knows (images, movie strips) when a file is saved elsewhere; it does not know the
add-on's own path properties (job records, takes, previews, the panel's file fields), so they are rebased here.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterator

import bpy

from .preferences import unsaved_dir
from .reference import strips_of

#: The folder beside the .blend that holds its results.
FOLDER = "flexiact"


def _own_paths() -> Iterator[tuple[Any, str]]:
    """(owner, property name) of every path the add-on stores itself, in every scene."""
    for scene in bpy.data.scenes:
        settings = scene.flexiact
        yield from ((settings, name) for name in ("target_path", "reference_path", "action_file"))
        for record in settings.jobs:
            yield record, "video_path"
            yield record, "preview_path"
            yield from ((take, "video_path") for take in record.takes)


def _absolute(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, path[2:])) if path.startswith("//") else path


def relocate(old_blend: str, new_blend: str) -> int:
    """Before saving to `new_blend`: move the results of the unsaved folder to `//flexiact/` beside it and point
    every user at them, and rebase the add-on's own relative paths on the new folder. Returns how many files
    moved; the user's own files elsewhere are never moved."""
    src = os.path.realpath(unsaved_dir())
    old_dir = os.path.dirname(os.path.abspath(old_blend)) if old_blend else ""
    new_dir = os.path.dirname(os.path.abspath(new_blend))
    dest = os.path.join(new_dir, FOLDER)
    moved: dict[str, str] = {}

    def move(full: str) -> str | None:
        """The new absolute path of a file of the unsaved folder (moved once), else None."""
        full = os.path.realpath(full)
        if os.path.dirname(full) != src:
            return None
        if full not in moved:
            if not os.path.isfile(full):
                return None
            os.makedirs(dest, exist_ok=True)
            moved[full] = shutil.move(full, os.path.join(dest, os.path.basename(full)))
        return moved[full]

    for owner, name in _own_paths():
        path = getattr(owner, name)
        if not path or (path.startswith("//") and not old_dir):
            continue
        full = _absolute(path, old_dir)
        new = move(full)
        if new is not None or path.startswith("//"):  # moved, or relative to a folder that changes
            setattr(owner, name, bpy.path.relpath(new or full, start=new_dir))
    # Blender rebases these itself as it writes: relative to the old folder when there is one, else absolute
    for datablock, attr in _datablock_paths():
        path = getattr(datablock, attr)
        new = move(bpy.path.abspath(path)) if path else None
        if new is not None:
            setattr(datablock, attr, bpy.path.relpath(new) if old_dir else new)
    return len(moved)


def _datablock_paths() -> Iterator[tuple[Any, str]]:
    """(datablock, attribute) of every file path Blender itself keeps that a FlexiAct result may be in."""
    for scene in bpy.data.scenes:
        yield from ((s, "filepath") for s in strips_of(scene) or () if s.type == "MOVIE")
    yield from ((image, "filepath") for image in bpy.data.images if image.source in {"FILE", "MOVIE"})
