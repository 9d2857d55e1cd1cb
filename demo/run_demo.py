"""The Blender half of the demo, run by a bpy venv's python: build a shot in code and drive the real add-on.

It installs the extension zip with Blender's own installer (into a throwaway user folder), builds an animated
character stand-in and a camera, then calls the add-on's operators exactly as the sidebar buttons do: capture
the target frame, extract an action from the scene's own animation, generate, import as strip and plane. It
saves OUT/demo.blend, copies the generated clip to OUT/demo.mp4 and writes OUT/demo.json (paths, timings) for
the contact sheet.

    .venv-bpy50/bin/python demo/run_demo.py --zip dist/flexiact-X.zip --url http://127.0.0.1:PORT --out out
"""

from __future__ import annotations

import argparse
import atexit
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Before bpy is imported: the extension is installed into a throwaway user folder, not the user's Blender.
if "BLENDER_USER_RESOURCES" not in os.environ:  # removed at exit: a demo leaves nothing in the temp folder
    os.environ["BLENDER_USER_RESOURCES"] = tempfile.mkdtemp(prefix="flexiact-demo-blender-")
    atexit.register(shutil.rmtree, os.environ["BLENDER_USER_RESOURCES"], ignore_errors=True)

import bpy  # noqa: E402

MODULE = "bl_ext.user_default.flexiact"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zip", type=Path, required=True, help="the extension zip to install")
    p.add_argument("--url", required=True, help="the backend's URL")
    p.add_argument("--token", default="")
    p.add_argument("--out", type=Path, default=Path("out"))
    p.add_argument("--frames", type=int, default=36, help="length of the scene's animation at 24 fps")
    p.add_argument("--extract-steps", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="generation steps")
    return p.parse_args(argv)


def _part(name: str, mesh_op: Any, parent: bpy.types.Object, location: tuple[float, float, float],
          scale: tuple[float, float, float], color: tuple[float, float, float, float], **kw: Any) -> bpy.types.Object:
    """One primitive of the stand-in, parented to `parent`, coloured through the viewport colour (Workbench)."""
    mesh_op(location=location, **kw)
    obj = bpy.context.active_object
    obj.name, obj.scale, obj.color = name, scale, color
    obj.parent = parent
    return obj


def build_scene(frames: int) -> bpy.types.Scene:
    """An empty file with a figure (body, head, two arms) that walks across, bobs and waves, and a camera."""
    bpy.ops.wm.read_homefile(use_empty=True)
    scene = bpy.context.scene
    scene.name = "Demo"
    scene.render.fps, scene.render.fps_base = 24, 1.0
    scene.frame_start, scene.frame_end, scene.frame_current = 1, frames, 1
    scene.render.resolution_x, scene.render.resolution_y = 720, 480
    scene.display.shading.color_type = "OBJECT"
    scene.display.shading.background_type = "VIEWPORT"
    world = bpy.data.worlds.new("World")
    world.color = (0.55, 0.62, 0.72)
    scene.world = world

    bpy.ops.mesh.primitive_plane_add(size=12, location=(0, 0, 0))
    ground = bpy.context.active_object
    ground.name, ground.color = "Ground", (0.35, 0.5, 0.3, 1.0)

    root = bpy.data.objects.new("Figure", None)
    scene.collection.objects.link(root)
    _part("Body", bpy.ops.mesh.primitive_cube_add, root, (0, 0, 1.0), (0.35, 0.22, 0.5), (0.85, 0.3, 0.2, 1.0))
    _part("Head", bpy.ops.mesh.primitive_uv_sphere_add, root, (0, 0, 1.8), (0.28, 0.28, 0.28), (0.95, 0.8, 0.6, 1.0),
          segments=24, ring_count=12)
    for side in (-1, 1):
        _part(f"Leg.{'LR'[side > 0]}", bpy.ops.mesh.primitive_cube_add, root, (0.17 * side, 0, 0.25),
              (0.1, 0.1, 0.25), (0.2, 0.25, 0.55, 1.0))
    arms = []
    for side in (-1, 1):
        pivot = bpy.data.objects.new(f"Shoulder.{'LR'[side > 0]}", None)
        scene.collection.objects.link(pivot)
        pivot.parent, pivot.location = root, (0.45 * side, 0, 1.4)
        _part(f"Arm.{'LR'[side > 0]}", bpy.ops.mesh.primitive_cube_add, pivot, (0, 0, -0.35), (0.08, 0.08, 0.35),
              (0.85, 0.3, 0.2, 1.0))
        arms.append((pivot, side))

    for f in range(1, frames + 1):  # walk left to right, bob twice per step, wave the arms
        phase = (f - 1) / max(1, frames - 1)
        root.location = (-1.5 + 3.0 * phase, 0, 0.12 * abs(math.sin(4 * math.pi * phase)))
        root.keyframe_insert("location", frame=f)
        for pivot, side in arms:
            pivot.rotation_euler = (0, -side * (0.4 + 1.2 * (0.5 + 0.5 * math.sin(6 * math.pi * phase))), 0)
            pivot.keyframe_insert("rotation_euler", frame=f)

    cam = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    scene.collection.objects.link(cam)
    cam.location, cam.rotation_euler = (0, -7.5, 1.6), (math.radians(86), 0, 0)
    scene.camera = cam
    return scene


def _timed(label: str, timings: dict[str, float], fn: Any, *args: Any, **kw: Any) -> Any:
    start = time.perf_counter()
    result = fn(*args, **kw)
    timings[label] = round(time.perf_counter() - start, 2)
    print(f"demo: {label:<22} {timings[label]:7.2f} s", flush=True)
    return result


def _ok(result: set[str], what: str) -> None:
    if result != {"FINISHED"}:
        raise SystemExit(f"demo: {what} did not finish: {result}; see the scene's last error above")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole loop; returns what OUT/demo.json records."""
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    _ok(_timed("install add-on", timings, bpy.ops.extensions.package_install_files, filepath=str(args.zip.resolve()),
               repo="user_default", enable_on_install=True), "installing the extension")
    addon = sys.modules[MODULE]
    scene = _timed("build scene", timings, build_scene, args.frames)
    prefs = bpy.context.preferences.addons[MODULE].preferences
    prefs.backend_url, prefs.token = args.url, args.token
    _ok(bpy.ops.flexiact.test_connection(), "connecting to the backend")
    print(f"demo: backend {addon.connection.CONNECTION.summary}", flush=True)
    blend = out / "demo.blend"
    bpy.context.preferences.filepaths.save_version = 0  # no demo.blend1 backups
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))  # results then go to OUT/flexiact/, stored blend-relative
    scene = bpy.context.scene
    s = scene.flexiact

    s.capture_engine = "WORKBENCH"
    scene.frame_current = 1
    _ok(_timed("capture target", timings, bpy.ops.flexiact.capture_target), "capturing the target frame")
    s.reference_source = "SCENE"
    s.caption = "a figure walks to the right waving its arms"
    s.extract_preset = "CUSTOM"
    s.extract_steps = args.extract_steps
    _ok(_timed(f"extract ({args.extract_steps} steps)", timings, bpy.ops.flexiact.extract_action), "extraction")
    s.prompt = "a figure walks to the right waving its arms"
    s.steps = args.steps
    s.import_mode = "BOTH"
    _ok(_timed(f"generate ({args.steps} steps)", timings, bpy.ops.flexiact.generate), "generation")
    record = s.jobs[-1]
    if record.status != "SUCCEEDED" or not record.imported:
        raise SystemExit(f"demo: generation ended {record.status}: {record.error}")
    bpy.ops.wm.save_mainfile()

    result = Path(bpy.path.abspath(record.video_path))
    shutil.copyfile(result, out / "demo.mp4")
    reference = sorted(glob.glob(str(out / "flexiact" / "reference_*.mp4")))
    editor = scene.sequence_editor
    strips = editor.strips if hasattr(editor, "strips") else editor.sequences
    strip = strips[record.strip_name]
    addon.runner.remove_timer()
    report = {
        "blender": bpy.app.version_string, "backend": addon.connection.CONNECTION.summary, "action": s.action_id,
        "job": record.job_id, "blend": str(blend), "video": str(out / "demo.mp4"),
        "target": bpy.path.abspath(s.target_image.filepath), "reference": reference[-1] if reference else None,
        "strip": {"name": strip.name, "start": strip.frame_final_start, "frames": strip.frame_final_duration},
        "plane": record.plane_name, "timings_s": timings,
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    print(f"demo: imported strip '{strip.name}' (frames {strip.frame_final_start}-{strip.frame_final_end - 1}) "
          f"and plane '{record.plane_name}'; saved {blend} and {out / 'demo.mp4'}", flush=True)
    return report


if __name__ == "__main__":
    run(parse_args(sys.argv[1:]))
