"""Where two patches lie in their scene: a small picture of the scene with both outlined.

For a tile pool (patches cut from whole scenes, so many patches share one source file and
each has its pixel window ``row_off``/``col_off``/``height``/``width`` in the footprints),
the picture of a scene is its own preview image when one lies beside the source file
(``thumbnail.png``, ``preview.jpg``, ...: Major TOM cells and many archives ship one), else
a low-resolution mosaic of the pool's own patches of that scene, drawn with the labeller's
pool-wide stretch. Patch windows map onto the picture by the scale between the scene's
pixel grid and the picture, so no reprojection is needed.

Pools of separate patches (EuroSAT, BigEarthNet: one source per patch) have no scene to
show: :meth:`SceneLocator.for_pool` returns None for them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anneal_geo.annotators.render import PatchRenderer
    from anneal_geo.data.pool import PatchPool

__all__ = ["LEFT_COLOUR", "RIGHT_COLOUR", "SceneLocator", "find_preview"]

#: Outline colours of the left and right patch (the page frames the patches alike).
LEFT_COLOUR = (255, 159, 28)
RIGHT_COLOUR = (46, 196, 241)

#: Longer side of a scene picture, in pixels.
PICTURE_SIZE = 320
#: Names of preview images looked for beside a scene's source file (case-insensitive).
_PREVIEW_NAMES = ("thumbnail", "preview", "quicklook", "overview", "rgb")
_PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: A scene with more patches than this gets no mosaic (too slow to read on first use).
_MOSAIC_LIMIT = 20_000


def find_preview(source: str | Path) -> Path | None:
    """A preview image in the folder of a scene's source file, or None."""
    folder = Path(source).parent
    if not folder.is_dir():
        return None
    found = []
    for path in sorted(folder.iterdir()):
        stem, suffix = path.stem.lower(), path.suffix.lower()
        if suffix in _PREVIEW_SUFFIXES and any(name in stem for name in _PREVIEW_NAMES):
            found.append(path)
    return found[0] if found else None


@dataclass
class _Scene:
    """One scene's picture and the scale from its pixel grid to the picture."""

    name: str
    picture: Any  # PIL.Image.Image, RGB
    scale: float
    from_preview: bool


class SceneLocator:
    """Draws the scene(s) of a pair with both patches outlined.

    Args:
        scenes: the scene pictures.
        scene_of: (N,) index into ``scenes`` of each patch id.
        windows: (N, 4) float ``row_off, col_off, height, width`` of each patch in its
            scene's grid.
    """

    def __init__(self, scenes: list[_Scene], scene_of: np.ndarray, windows: np.ndarray) -> None:
        self.scenes = scenes
        self.scene_of = scene_of
        self.windows = windows

    @property
    def note(self) -> str:
        """How the scene pictures were made (shown under the locator)."""
        if all(s.from_preview for s in self.scenes):
            return "scene preview"
        if not any(s.from_preview for s in self.scenes):
            return "scene mosaic of the pool's patches"
        return "scene preview or mosaic"

    @classmethod
    def for_pool(cls, pool: PatchPool, renderer: PatchRenderer) -> SceneLocator | None:
        """The locator of a tile pool, or None when patches do not share scenes."""
        footprints = pool.footprints
        if footprints is None or len(footprints) != len(pool):
            return None
        columns = ("source", "row_off", "col_off", "height", "width")
        if any(c not in footprints.columns for c in columns):
            return None
        frame = footprints.sort_values("patch_id")
        try:
            windows = frame[["row_off", "col_off", "height", "width"]].to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if not np.isfinite(windows).all():
            return None
        sources = frame["source"].astype(str).to_numpy()
        names, scene_of = np.unique(sources, return_inverse=True)
        if len(names) == len(pool):  # one source per patch: no scene to show
            return None
        scenes = [
            cls._scene(str(name), np.flatnonzero(scene_of == k), windows, renderer)
            for k, name in enumerate(names)
        ]
        if any(s is None for s in scenes):
            return None
        return cls([s for s in scenes if s is not None], scene_of.astype(np.int64), windows)

    @staticmethod
    def _grid(source: str, ids: np.ndarray, windows: np.ndarray) -> tuple[int, int]:
        """(height, width) of the scene's pixel grid: the source's size, else from windows."""
        path = Path(source)
        if path.is_file():
            try:
                import rasterio

                with rasterio.open(path) as src:
                    return int(src.height), int(src.width)
            except Exception:  # an unreadable source falls back to the windows
                pass
        w = windows[ids]
        # The patch grid is centred in the scene (the remainder split evenly).
        height = float((w[:, 0] + w[:, 2]).max() + w[:, 0].min())
        width = float((w[:, 1] + w[:, 3]).max() + w[:, 1].min())
        return round(height), round(width)

    @classmethod
    def _scene(
        cls, source: str, ids: np.ndarray, windows: np.ndarray, renderer: PatchRenderer
    ) -> _Scene | None:
        from PIL import Image

        height, width = cls._grid(source, ids, windows)
        if height <= 0 or width <= 0:
            return None
        scale = PICTURE_SIZE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        preview = find_preview(source)
        if preview is not None:
            try:
                with Image.open(preview) as image:
                    picture = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
                return _Scene(Path(source).parent.name, picture, scale, True)
            except OSError:
                pass
        if len(ids) > _MOSAIC_LIMIT:
            return None
        canvas = Image.new("RGB", size, (40, 40, 40))
        for patch_id in ids.tolist():
            row, col, h, w = windows[patch_id]
            tile = Image.fromarray(renderer.composite(int(patch_id)))
            box = (round(col * scale), round(row * scale))
            tile_size = (max(1, round(w * scale)), max(1, round(h * scale)))
            canvas.paste(tile.resize(tile_size, Image.Resampling.BOX), box)
        return _Scene(Path(source).parent.name, canvas, scale, False)

    def _panel(self, scene: _Scene, marks: list[tuple[int, tuple[int, int, int]]]) -> Any:
        from PIL import ImageDraw

        picture = scene.picture.copy()
        draw = ImageDraw.Draw(picture)
        for patch_id, colour in marks:
            row, col, h, w = self.windows[patch_id] * scene.scale
            x0, y0 = col, row
            # At least 7 px, so a small patch on a large scene stays visible.
            x1, y1 = max(col + w, x0 + 7), max(row + h, y0 + 7)
            draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline=(0, 0, 0), width=1)
            draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        return picture

    def jpeg(self, i: int, j: int) -> bytes:
        """JPEG bytes: the scene of patch ``i`` and ``j`` (two panels when they differ)."""
        from PIL import Image

        left, right = int(self.scene_of[i]), int(self.scene_of[j])
        if left == right:
            picture = self._panel(self.scenes[left], [(i, LEFT_COLOUR), (j, RIGHT_COLOUR)])
        else:
            a = self._panel(self.scenes[left], [(i, LEFT_COLOUR)])
            b = self._panel(self.scenes[right], [(j, RIGHT_COLOUR)])
            picture = Image.new("RGB", (a.width + 6 + b.width, max(a.height, b.height)), "white")
            picture.paste(a, (0, 0))
            picture.paste(b, (a.width + 6, 0))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()
