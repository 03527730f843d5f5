"""A tiny synthetic Nerfstudio dataset: a shaded sphere seen from a circle of cameras.

``make_scene(dest)`` writes what ``ns-train … nerfstudio-data --data dest`` reads:

- ``dest/transforms.json``: shared pinhole intrinsics (``fl_x``, ``fl_y``, ``cx``, ``cy``,
  ``w``, ``h``, ``camera_model: OPENCV``, no distortion) and one frame per image with its
  ``file_path`` (``images/frame_00001.png``, …) and 4x4 camera-to-world ``transform_matrix``
  in Nerfstudio's (OpenGL) convention: the camera looks down its -Z axis, +Y up, +X right;
- ``dest/images/frame_XXXXX.png``: 8-bit RGB PNGs, ray-traced here in pure Python: a unit
  sphere at the origin coloured by its surface normal and lit from one direction, in front of a
  sky gradient. Every view renders the same 3D scene, so the frames are multi-view consistent
  (a model can actually fit them), and the output is byte-for-byte deterministic;
- ``dest/sparse_pc.ply`` (unless ``points=0``), named by ``ply_file_path``: an ASCII PLY of
  ``points`` coloured points on the sphere's surface, standing in for the sparse COLMAP cloud
  that ``ns-process-data`` writes. splatfacto initialises its Gaussians from it
  (``load_3D_points=True``); nerfacto ignores it.

The cameras sit on a circle of radius ``CAMERA_RADIUS`` at height ``CAMERA_HEIGHT`` around the
world +Z axis, all looking at the origin, with a ``FIELD_OF_VIEW_DEG`` horizontal field of view.

``make_scene_zip(dest)`` packs such a scene into a zip, as a user uploads it for the ``file``
input of a Nerfstudio task: members at the archive root, or under one folder.

``make_photos_zip(dest)`` is what a user uploads for an ``images`` input instead: photos only,
no poses, for ``ns-process-data`` (real COLMAP) to recover. A shaded sphere has no features
SIFT can match, so these views see a sphere and a ground plane covered in high-contrast value
noise (three octaves of a hashed lattice), from cameras on an arc of ``PHOTO_ARC_DEG``: 12
photos of 192x192 take about 6 s here, and COLMAP 3.8 (CPU) registers all of them in about 8 s.

Only the standard library is used (``zlib`` for PNG): the project venv has neither Pillow nor
numpy. 12 images of 32x32 take about 0.1 s.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "CAMERA_RADIUS",
    "FIELD_OF_VIEW_DEG",
    "make_photos_zip",
    "make_scene",
    "make_scene_zip",
    "write_png",
]

CAMERA_RADIUS = 3.0
CAMERA_HEIGHT = 1.0
FIELD_OF_VIEW_DEG = 50.0
SPHERE_RADIUS = 1.0
IMAGES_FOLDER = "images"
POINT_CLOUD_FILE = "sparse_pc.ply"
PHOTO_ARC_DEG = 120.0
GROUND_Z = -1.0
GROUND_HALF_SIZE = 6.0

Vector = tuple[float, float, float]
Matrix = list[list[float]]

_LIGHT = (0.48, -0.36, 0.8)  # unit vector towards the light
_AMBIENT = 0.25


def make_scene(dest: Path, images: int = 12, size: int = 32, *, points: int = 256) -> Path:
    """Write a ``size``x``size`` scene of ``images`` views into ``dest``; return ``dest``.

    ``points`` is the size of the sparse point cloud (0: none, no ``ply_file_path``). ``dest``
    is created if needed; existing files of the same names are overwritten.
    """
    if images < 1 or size < 2:
        raise ValueError(f"need at least 1 image of at least 2x2 pixels, not {images} of {size}")
    focal = 0.5 * size / math.tan(math.radians(FIELD_OF_VIEW_DEG) / 2)
    centre = size / 2
    (dest / IMAGES_FOLDER).mkdir(parents=True, exist_ok=True)
    frames = []
    for index in range(images):
        angle = 2 * math.pi * index / images
        position = (
            CAMERA_RADIUS * math.cos(angle),
            CAMERA_RADIUS * math.sin(angle),
            CAMERA_HEIGHT,
        )
        rotation = _look_at(position)
        name = f"{IMAGES_FOLDER}/frame_{index + 1:05d}.png"
        pixels = _render(position, rotation, size, focal, centre)
        (dest / name).write_bytes(write_png(size, size, pixels))
        matrix = [[*rotation[row], position[row]] for row in range(3)]
        matrix.append([0.0, 0.0, 0.0, 1.0])
        frames.append(
            {
                "file_path": name,
                "transform_matrix": [[round(value, 9) for value in row] for row in matrix],
            }
        )
    transforms: dict[str, object] = {
        "camera_model": "OPENCV",
        "fl_x": focal,
        "fl_y": focal,
        "cx": centre,
        "cy": centre,
        "w": size,
        "h": size,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": frames,
    }
    if points > 0:
        (dest / POINT_CLOUD_FILE).write_text(_point_cloud(points), "ascii")
        transforms["ply_file_path"] = POINT_CLOUD_FILE
    (dest / "transforms.json").write_text(json.dumps(transforms, indent=2) + "\n", "utf-8")
    return dest


def make_scene_zip(
    dest: Path,
    images: int = 12,
    size: int = 32,
    *,
    points: int = 256,
    folder: str | None = None,
) -> Path:
    """Write a scene as the zip file ``dest`` (members under ``folder/`` if given); return it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{folder.strip('/')}/" if folder else ""
    with tempfile.TemporaryDirectory(prefix="scene-") as scratch:
        scene = make_scene(Path(scratch), images=images, size=size, points=points)
        with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(scene.rglob("*")):
                if path.is_file():
                    archive.write(path, prefix + path.relative_to(scene).as_posix())
    return dest


def make_photos_zip(
    dest: Path, images: int = 12, size: int = 192, *, arc_deg: float = PHOTO_ARC_DEG
) -> Path:
    """Write ``images`` textured ``size``x``size`` photos (no poses) as the zip ``dest``."""
    if images < 2 or size < 16:
        raise ValueError(f"need at least 2 photos of at least 16x16, not {images} of {size}")
    focal = 0.5 * size / math.tan(math.radians(FIELD_OF_VIEW_DEG) / 2)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index in range(images):
            angle = math.radians(arc_deg) * index / (images - 1)
            position = (
                CAMERA_RADIUS * math.cos(angle),
                CAMERA_RADIUS * math.sin(angle),
                CAMERA_HEIGHT,
            )
            pixels = _render(position, _look_at(position), size, focal, size / 2, shade=_textured)
            archive.writestr(f"photo_{index + 1:03d}.png", write_png(size, size, pixels))
    return dest


def write_png(width: int, height: int, rgb: bytes) -> bytes:
    """Encode ``rgb`` (row-major 8-bit RGB, ``width * height * 3`` bytes) as a PNG file."""
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{len(rgb)} bytes is not {width}x{height} RGB")
    raw = b"".join(b"\x00" + rgb[row * stride : (row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 9))
        + _chunk(b"IEND", b"")
    )


def _point_cloud(count: int) -> str:
    """An ASCII PLY of ``count`` points spread evenly over the sphere, in their lit colours."""
    lines = [
        "ply",
        "format ascii 1.0",
        f"element vertex {count}",
        *(f"property float {axis}" for axis in "xyz"),
        *(f"property uchar {channel}" for channel in ("red", "green", "blue")),
        "end_header",
    ]
    golden = math.pi * (3 - math.sqrt(5))  # a Fibonacci lattice: even, deterministic
    for index in range(count):
        z = 1 - 2 * (index + 0.5) / count
        ring = math.sqrt(1 - z * z)
        normal = (ring * math.cos(golden * index), ring * math.sin(golden * index), z)
        position = " ".join(f"{SPHERE_RADIUS * axis:.6f}" for axis in normal)
        colour = " ".join(str(_to_byte(channel)) for channel in _surface_colour(normal))
        lines.append(f"{position} {colour}")
    return "\n".join(lines) + "\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _look_at(position: Vector) -> Matrix:
    """Camera-to-world rotation (rows) for a camera at ``position`` looking at the origin."""
    back = _normalise(position)  # the camera's +Z points away from what it looks at
    right = _normalise(_cross((0.0, 0.0, 1.0), back))
    up = _cross(back, right)
    return [[right[row], up[row], back[row]] for row in range(3)]


def _render(
    position: Vector,
    rotation: Matrix,
    size: int,
    focal: float,
    centre: float,
    *,
    shade: Callable[[Vector, Vector], Vector] | None = None,
) -> bytes:
    """Ray-trace one ``size``x``size`` view with ``shade`` (default: the lit sphere)."""
    shade = shade or _shade
    out = bytearray()
    for v in range(size):
        for u in range(size):
            camera = ((u + 0.5 - centre) / focal, -(v + 0.5 - centre) / focal, -1.0)
            direction = _normalise(
                (
                    sum(rotation[0][k] * camera[k] for k in range(3)),
                    sum(rotation[1][k] * camera[k] for k in range(3)),
                    sum(rotation[2][k] * camera[k] for k in range(3)),
                )
            )
            out += bytes(_to_byte(channel) for channel in shade(position, direction))
    return bytes(out)


def _shade(origin: Vector, direction: Vector) -> Vector:
    """The colour seen along a unit ray: the lit sphere where it hits, else the sky."""
    # |origin + t d|^2 = r^2 with |d| = 1: t^2 + 2 b t + c = 0
    b = _dot(origin, direction)
    c = _dot(origin, origin) - SPHERE_RADIUS**2
    discriminant = b * b - c
    if discriminant >= 0:
        t = -b - math.sqrt(discriminant)
        if t > 0:
            hit = tuple(origin[k] + t * direction[k] for k in range(3))
            return _surface_colour((hit[0], hit[1], hit[2]))
    up = 0.5 + 0.5 * direction[2]  # sky: white at the horizon, blue above, brown below
    if up >= 0.5:
        return (1.0 - 0.6 * (up - 0.5) * 2, 1.0 - 0.4 * (up - 0.5) * 2, 1.0)
    return (0.55 + 0.45 * up * 2, 0.45 + 0.55 * up * 2, 0.35 + 0.65 * up * 2)


def _textured(origin: Vector, direction: Vector) -> Vector:
    """The colour along a unit ray in the photo scene: noise on the sphere and the ground."""
    b = _dot(origin, direction)
    discriminant = b * b - (_dot(origin, origin) - SPHERE_RADIUS**2)
    if discriminant >= 0:
        t = -b - math.sqrt(discriminant)
        if t > 0:
            return _noise_colour(tuple(origin[k] + t * direction[k] for k in range(3)), 1.0)
    if direction[2] < 0:
        t = (GROUND_Z - origin[2]) / direction[2]
        x, y = origin[0] + t * direction[0], origin[1] + t * direction[1]
        if abs(x) < GROUND_HALF_SIZE and abs(y) < GROUND_HALF_SIZE:
            return _noise_colour((x, y, 7.5), 0.0)  # another slice of the same noise
    return (0.8, 0.85, 1.0)


def _noise_colour(point: Sequence[float], tint: float) -> Vector:
    """High-contrast yellow/blue value noise at ``point`` (three octaves)."""
    value = 0.5 * _noise(point, 4) + 0.3 * _noise(point, 9) + 0.2 * _noise(point, 20)
    value = max(0.0, min(1.0, (value - 0.5) * 3 + 0.5))
    return (value, value * 0.8 + 0.1 * tint, 1 - value)


def _noise(point: Sequence[float], scale: float) -> float:
    """Trilinear value noise in 0..1 over an integer lattice of ``1/scale`` spacing."""
    x, y, z = point[0] * scale, point[1] * scale, point[2] * scale
    xi, yi, zi = math.floor(x), math.floor(y), math.floor(z)
    fx, fy, fz = x - xi, y - yi, z - zi
    total = 0.0
    for dx, wx in ((0, 1 - fx), (1, fx)):
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dz, wz in ((0, 1 - fz), (1, fz)):
                total += wx * wy * wz * _lattice(xi + dx, yi + dy, zi + dz)
    return total


def _lattice(x: int, y: int, z: int) -> float:
    """A deterministic pseudo-random value in 0..1 per lattice point (an integer hash)."""
    n = (x * 73856093) ^ (y * 19349663) ^ (z * 83492791)
    n = (n ^ (n >> 13)) * 1274126177
    return ((n ^ (n >> 16)) & 0xFFFF) / 65535.0


def _surface_colour(point: Vector) -> Vector:
    """The sphere's (view-independent) colour at a surface point: its normal, lit diffusely."""
    normal = _normalise(point)
    light = _AMBIENT + (1 - _AMBIENT) * max(0.0, _dot(normal, _LIGHT))
    return (
        light * (0.5 + 0.5 * normal[0]),
        light * (0.5 + 0.5 * normal[1]),
        light * (0.5 + 0.5 * normal[2]),
    )


def _to_byte(value: float) -> int:
    """Clamp a 0..1 channel to 0..255."""
    return max(0, min(255, round(value * 255)))


def _dot(a: Vector, b: Vector) -> float:
    """Dot product."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: Vector, b: Vector) -> Vector:
    """Cross product."""
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _normalise(a: Vector) -> Vector:
    """``a`` scaled to unit length."""
    length = math.sqrt(_dot(a, a))
    return (a[0] / length, a[1] / length, a[2] / length)
