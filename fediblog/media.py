"""The media store: the images a post shows, and the blog's avatar and header.

An image referenced in a post by a local path (relative to the post file) is imported
here when the post is published or edited:

* checked first: at most ``MAX_FILE_BYTES``; a JPEG, PNG, WebP or GIF (the first frame
  of a GIF, stored as PNG); at most ``MAX_PIXELS`` pixels (Pillow's decompression-bomb
  guard is set to the same number). SVG is refused: it is a document that can carry
  scripts and links, not a picture.
* decoded, turned the way its EXIF orientation says, and re-encoded without any
  metadata (EXIF, GPS, XMP, comments): a phone's location never reaches the page;
* named by the sha256 of that stripped full-size encoding, and stored as resized
  variants ``{hash}-{width}.{ext}`` (``VARIANT_WIDTHS``, never upscaled) under
  FEDIBLOG_MEDIA_DIR, each written atomically, then catalogued in the database.

Files are never changed once written (their name is their content), so web/media.py
serves them as immutable. ``prune`` deletes what no post, avatar or header names.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

from fediblog.activitystreams import Urls, build_actor, build_actor_update
from fediblog.config import Settings
from fediblog.errors import FediblogError
from fediblog.models import MEDIA_TYPES, MediaImage, OutgoingActivity, Post, utcnow
from fediblog.render import local_images, markdown_images, markdown_to_html
from fediblog.store import Store

if TYPE_CHECKING:
    from PIL import Image

MAX_FILE_BYTES = 20_000_000
MAX_PIXELS = 50_000_000
VARIANT_WIDTHS = (480, 960, 1600)
FACE_ROLES = ("avatar", "header")
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "png"}
MEDIA_FILE = re.compile(r"^([0-9a-f]{64})-([1-9][0-9]{0,4})\.(jpg|png|webp|gif)$")
_MEDIA_REF = re.compile(r"/media/([0-9a-f]{64})-")


class MediaError(FediblogError):
    """An image that cannot be imported: missing, too big, not an image, a bomb, an SVG."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """An image decoded, stripped and resized, not yet written."""

    image: MediaImage
    files: dict[int, bytes]  # width -> encoded bytes


@dataclass(frozen=True, slots=True)
class MediaEntry:
    """One stored image, as `fediblog media list` shows it."""

    image: MediaImage
    size: int
    used_by: tuple[str, ...]  # post slugs, and "avatar"/"header"


def prepare_image(path: Path) -> Prepared:
    """Check, decode, strip and resize an image file; MediaError with one line if it
    cannot be. Pure CPU and one read: nothing is written."""
    path = path.expanduser()
    try:
        size = path.stat().st_size
    except OSError as cause:
        raise MediaError(f"image {path}: cannot read it ({cause.strerror or cause})") from None
    _check_size(size, path)
    try:
        raw = path.read_bytes()
    except OSError as cause:
        raise MediaError(f"image {path}: cannot read it ({cause.strerror or cause})") from None
    return prepare_image_bytes(raw, path)


def _check_size(size: int, path: Path) -> None:
    if size > MAX_FILE_BYTES:
        raise MediaError(
            f"image {path}: {size / 1_000_000:.1f} MB is more than {MAX_FILE_BYTES // 1_000_000} MB"
        )


def prepare_image_bytes(raw: bytes, path: Path) -> Prepared:
    """``prepare_image`` for an image already in memory (an upload to the desk);
    ``path`` is its name as given, for messages and its suffix."""
    # Imported on first use: a server that is given no image never holds Pillow
    # (~2.5 MB of each process's memory).
    from PIL import Image, ImageOps, UnidentifiedImageError

    _check_size(len(raw), path)
    if not raw:
        raise MediaError(f"image {path}: the file is empty")
    head = raw[:512].lstrip().lower()
    if path.suffix.lower() in (".svg", ".svgz") or head.startswith((b"<svg", b"<?xml")):
        raise MediaError(
            f"image {path}: SVG is not accepted (it can carry scripts); export it as PNG"
        )
    # Set here, not at import time: the same limit as ours, so Pillow refuses a bomb
    # before it allocates it, whatever the header claims.
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as opened:
                kind = opened.format or ""
                if kind not in _FORMATS:
                    raise MediaError(
                        f"image {path}: {kind or 'this'} format is not accepted"
                        " (JPEG, PNG, WebP or GIF)"
                    )
                if opened.width * opened.height > MAX_PIXELS:
                    raise _bomb(path, opened.width, opened.height)
                opened.seek(0)  # a GIF's first frame
                picture = ImageOps.exif_transpose(opened)
                picture.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(
            f"image {path}: more than {MAX_PIXELS // 1_000_000} megapixels"
            " (a decompression bomb?); refused"
        ) from None
    except UnidentifiedImageError:
        raise MediaError(f"image {path}: not an image (JPEG, PNG, WebP or GIF)") from None
    except (OSError, ValueError, SyntaxError) as cause:
        raise MediaError(f"image {path}: cannot decode it ({cause})") from None
    ext = _FORMATS[kind]
    picture = _encodable(picture, ext)
    original = _encode(picture, ext)
    digest = hashlib.sha256(original).hexdigest()
    width, height = picture.size
    files: dict[int, bytes] = {}
    variants: list[tuple[int, int]] = []
    for target in _variant_widths(width):
        if target == width:
            files[target], size_of = original, (width, height)
        else:
            size_of = (target, max(1, round(height * target / width)))
            files[target] = _encode(picture.resize(size_of, Image.Resampling.LANCZOS), ext)
        variants.append(size_of)
    return Prepared(MediaImage(hash=digest, ext=ext, variants=tuple(variants)), files)


def _bomb(path: Path, width: int, height: int) -> MediaError:
    return MediaError(
        f"image {path}: {width}x{height} is more than {MAX_PIXELS // 1_000_000} megapixels"
        " (a decompression bomb?); refused"
    )


def _variant_widths(width: int) -> list[int]:
    largest = min(width, VARIANT_WIDTHS[-1])
    return sorted({w for w in VARIANT_WIDTHS if w < largest} | {largest})


def _encodable(picture: Image.Image, ext: str) -> Image.Image:
    """A mode the format can hold, and no metadata left in ``info`` (EXIF, XMP, ICC,
    comments) for any encoder to copy; a transparent colour becomes an alpha channel."""
    if ext == "jpg" and picture.mode not in ("RGB", "L"):
        picture = picture.convert("RGB")
    elif ext != "jpg" and (
        picture.mode not in ("RGB", "RGBA", "L", "LA") or "transparency" in picture.info
    ):
        picture = picture.convert("RGBA")
    else:
        picture = picture.copy()
    picture.info = {}
    return picture


def _encode(picture: Image.Image, ext: str) -> bytes:
    """Encode with no metadata: Pillow writes EXIF, XMP or comments only when asked."""
    out = io.BytesIO()
    if ext == "jpg":
        picture.save(out, "JPEG", quality=85, progressive=True)
    elif ext == "webp":
        picture.save(out, "WEBP", quality=82)
    else:
        picture.save(out, "PNG")
    return out.getvalue()


def _write_files(root: Path, prepared: Prepared) -> int:
    """Each variant to its own name, atomically (a reader never sees half a file);
    the bytes all of them take."""
    image = prepared.image
    root.mkdir(parents=True, exist_ok=True)
    size = 0
    for width, data in prepared.files.items():
        target = root / f"{image.hash}-{width}.{image.ext}"
        size += len(data)
        if target.is_file() and target.stat().st_size == len(data):
            continue  # content-addressed: already there
        atomic_write(target, data)
    return size


def atomic_write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` so that a reader sees the old file or the whole new
    one, never half of it: a temporary file in the same folder, synced, then renamed."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".write-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _delete_files(root: Path, images: list[MediaImage]) -> int:
    freed = 0
    for image in images:
        for width, _height in image.variants:
            path = root / f"{image.hash}-{width}.{image.ext}"
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
    return freed


class MediaStore:
    """The files under FEDIBLOG_MEDIA_DIR and their catalogue in the database."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.root = settings.media_dir
        self.store = store

    def file_for(self, name: str) -> Path | None:
        """The file a ``/media/`` name stands for, if the name is well formed and exists."""
        if not MEDIA_FILE.fullmatch(name):
            return None
        path = self.root / name
        return path if path.is_file() else None

    async def save(self, prepared: Prepared) -> MediaImage:
        """Write a prepared image's files (each atomically) and catalogue it."""
        size = await asyncio.to_thread(_write_files, self.root, prepared)
        await self.store.save_media(prepared.image, size)
        return prepared.image

    async def import_file(self, path: Path) -> MediaImage:
        return await self.save(await asyncio.to_thread(prepare_image, path))

    async def import_bytes(self, raw: bytes, name: str) -> MediaImage:
        """An uploaded image (the desk's editor): checked and stored as a file would be."""
        return await self.save(await asyncio.to_thread(prepare_image_bytes, raw, Path(name)))

    async def known_images(
        self, body_md: str, previous: Post | None = None
    ) -> dict[str, MediaImage]:
        """The images of a post's Markdown already in the store, keyed by src as written:
        each ``/media/`` path the store holds, and, for an edit of ``previous``, each
        local path its post file named, as imported then (read back from its HTML: the
        same Markdown rendered without the store puts the local paths where the stored
        ones are)."""
        wanted = {src for src, _ in markdown_images(body_md)}
        found: dict[str, MediaImage] = {}
        pairs: list[tuple[str, str]] = [(src, src) for src in wanted]
        if previous is not None:
            written = _img_sources(markdown_to_html(previous.body_md))
            shown = _img_sources(previous.body_html)
            if len(written) == len(shown):
                pairs += [(w, s) for w, s in zip(written, shown, strict=True) if w in wanted]
        for src, stored in pairs:
            named = MEDIA_FILE.fullmatch(stored.removeprefix("/media/"))
            if src in found or not stored.startswith("/media/") or named is None:
                continue
            image = await self.store.get_media(named.group(1))
            if image is not None:
                found[src] = image
        return found

    async def import_post_images(self, body_md: str, base_dir: Path) -> dict[str, MediaImage]:
        """Every local image of a post's Markdown, keyed by its src as written. All are
        checked before any is written: one bad image stores nothing."""
        found = [(src, base_dir / relative) for src, relative in local_images(body_md)]
        prepared = [(src, await asyncio.to_thread(prepare_image, p)) for src, p in found]
        return {src: await self.save(ready) for src, ready in prepared}

    async def list_entries(self) -> list[MediaEntry]:
        users = await self._users()
        return [
            MediaEntry(image, size, tuple(users.get(image.hash, ())))
            for image, size in await self.store.list_media()
        ]

    async def prune(self) -> tuple[int, int]:
        """Delete the images nothing uses: (how many, bytes freed)."""
        users = await self._users()
        unused = [(image, size) for image, size in await self.store.list_media()
                  if image.hash not in users]  # fmt: skip
        freed = await asyncio.to_thread(_delete_files, self.root, [i for i, _ in unused])
        await self.store.delete_media(image.hash for image, _ in unused)
        return len(unused), freed

    async def _users(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        for slug, text in await self.store.list_media_references():
            for digest in dict.fromkeys(_MEDIA_REF.findall(text)):
                users.setdefault(digest, []).append(slug)
        for role in FACE_ROLES:
            digest = await self.store.get_meta_value(f"face:{role}")
            if digest:
                users.setdefault(digest, []).append(role)
        return users

    # ---- the blog's face: avatar and header ------------------------------------------

    async def load_face(self) -> dict[str, MediaImage]:
        """The avatar and header the database remembers, by role."""
        face: dict[str, MediaImage] = {}
        for role in FACE_ROLES:
            digest = await self.store.get_meta_value(f"face:{role}")
            image = await self.store.get_media(digest) if digest else None
            if image is not None:
                face[role] = image
        return face

    async def sync_face(self, public_key_pem: str) -> bool:
        """Import FEDIBLOG_AVATAR and FEDIBLOG_HEADER; when they or anything else in the
        actor document differs from what the database remembers, remember the new ones
        and queue one Update of the actor to every follower (in one transaction). True
        if an Update was queued."""
        wanted: dict[str, MediaImage | None] = {}
        for role in FACE_ROLES:
            given = getattr(self.settings, role)
            wanted[role] = await self.import_file(Path(given)) if given else None
        face = {role: image for role, image in wanted.items() if image is not None}
        actor = build_actor(
            self.settings,
            public_key_pem,
            await self.store.get_created_at(),
            icon=face.get("avatar"),
            header=face.get("header"),
        )
        now = {role: image.hash if image else None for role, image in wanted.items()}
        # Whatever followers' servers keep of the blog's profile (name, bio, avatar,
        # header, the featured collection's URL) is in the actor: when it changes, one
        # Update, or they go on showing the old one.
        now["actor"] = hashlib.sha256(json.dumps(actor, sort_keys=True).encode()).hexdigest()
        remembered = {role: await self.store.get_meta_value(f"face:{role}") for role in now}
        if now == remembered:
            return False
        update = build_actor_update(self.settings, actor, utcnow())
        await self.store.save_face(
            now,
            OutgoingActivity(
                ap_id=update["id"],
                type="Update",
                payload=json.dumps(update, ensure_ascii=False, separators=(",", ":")),
            ),
        )
        return True


class _ImgSources(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.found.append(dict(attrs).get("src") or "")


def _img_sources(html: str) -> list[str]:
    reader = _ImgSources()
    reader.feed(html)
    reader.close()
    return reader.found


def media_url(settings: Settings, image: MediaImage, width: int | None = None) -> str:
    """The absolute URL of one variant (the largest by default)."""
    return Urls.of(settings).base + image.path(width or image.largest[0])


def media_type_of(name: str) -> str:
    return MEDIA_TYPES[name.rsplit(".", 1)[-1]]


def describe(entries: Iterable[MediaEntry]) -> list[str]:
    """`fediblog media list`, one line an image."""
    return [
        f"{e.image.hash[:16]}  {e.size:>10,} B  {e.image.media_type:<10}"
        f"  {e.image.largest[0]}x{e.image.largest[1]}  {', '.join(e.used_by) or '(unused)'}"
        for e in entries
    ]
