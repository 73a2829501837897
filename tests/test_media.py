"""Images in posts, the media store, and the blog's avatar and header (media.py).

Every image is made here with Pillow: a phone-like JPEG with EXIF orientation and GPS,
a PNG, a bomb, an SVG; no binary fixture.
"""

from __future__ import annotations

import asyncio
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import ExifTags, Image, ImageDraw

from fediblog.blog import read_post_file
from fediblog.config import load_settings
from fediblog.media import MAX_PIXELS, MediaStore, prepare_image
from fediblog.web.deps import Services
from tests.conftest import BASE_URL, make_settings
from tests.helpers import run, running, soup
from tests.test_federation_e2e import World

ACTIVITY_JSON = "application/activity+json"
IMMUTABLE = "public, max-age=31536000, immutable"


def phone_photo(path: Path, size: tuple[int, int] = (2000, 1500)) -> Path:
    """A JPEG as a phone writes it: turned by EXIF (orientation 6), with a GPS position."""
    picture = Image.new("RGB", size, "skyblue")
    ImageDraw.Draw(picture).rectangle((0, 0, size[0] // 3, size[1] // 3), fill="red")
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown turned 90° clockwise
    exif[ExifTags.Base.Make] = "PhoneMaker"
    exif.get_ifd(ExifTags.IFD.GPSInfo).update(
        {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
    )
    picture.save(path, "JPEG", exif=exif)
    return path


def png(path: Path, size: tuple[int, int] = (300, 200), colour: str = "green") -> Path:
    Image.new("RGBA", size, colour).save(path, "PNG")
    return path


def post_file(folder: Path, body: str, name: str = "post.md", **front: str) -> Path:
    lines = "".join(f"{key}: {value}\n" for key, value in front.items())
    path = folder / name
    path.write_text(f"---\ntitle: Photos\n{lines}---\n{body}\n")
    return path


def media_files(folder: Path) -> list[str]:
    root = folder / "data" / "media"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture
def blog(blog_dir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert run(capsys, "init")[0] == 0
    return blog_dir


def _publish_photos(blog: Path, capsys: pytest.CaptureFixture[str]) -> str:
    folder = blog / "writing"
    (folder / "img").mkdir(parents=True)
    phone_photo(folder / "img" / "cat photo.jpg")
    png(folder / "map.png")
    path = post_file(
        folder,
        "Look:\n\n![A cat on a red sofa](<img/cat photo.jpg>)\n\n![A map of the walk](map.png)",
        image="https://cdn.example/cover.jpg",
        image_alt="The sofa, from above",
    )
    code, out, err = run(capsys, "post", "new", str(path))
    assert (code, err) == (0, "")
    return out.strip()


@pytest.mark.anyio
async def test_local_images_are_served_resized_without_exif_with_srcset_and_alt(
    blog: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    published = await asyncio.to_thread(_publish_photos, blog, capsys)  # the CLI: its own loop
    assert published == "published https://blog.example/posts/photos"

    async with running(load_settings()) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as web:
            page = soup((await web.get("/posts/photos")).text)
            cat, walk = page.select("article img[srcset]")
            assert page.select_one("img.cover")["alt"] == "The sofa, from above"
            assert cat["alt"] == "A cat on a red sofa"
            assert walk["alt"] == "A map of the walk"
            # The EXIF orientation is applied: the 2000x1500 photo is portrait now.
            assert (cat["width"], cat["height"]) == ("1500", "2000")
            assert (walk["width"], walk["height"]) == ("300", "200")
            assert cat["loading"] == walk["loading"] == "lazy"
            assert cat["sizes"]
            widths = []
            for img, kind in ((cat, "image/jpeg"), (walk, "image/png")):
                for candidate in str(img["srcset"]).split(", "):
                    url, descriptor = candidate.split()
                    response = await web.get(url)
                    assert response.status_code == 200, url
                    assert response.headers["content-type"] == kind
                    assert response.headers["cache-control"] == IMMUTABLE
                    assert response.headers["x-content-type-options"] == "nosniff"
                    stored = Image.open(io.BytesIO(response.content))
                    assert f"{stored.width}w" == descriptor
                    if kind == "image/jpeg":
                        assert dict(stored.getexif()) == {}
                        assert "exif" not in stored.info
                        widths.append(stored.width)
            assert widths == [480, 960, 1500]  # never upscaled past the original
            assert str(cat["src"]).endswith("-960.jpg")
            assert (await web.get("/media/" + "0" * 64 + "-480.jpg")).status_code == 404
            assert (await web.get("/media/..%2Fdata%2Ffediblog.db")).status_code == 404

            # The federated Article: both images as attachments, alt text as name.
            post = await app.state.services.store.get_post_by_slug("photos")
            response = await web.get(f"/p/{post.uid}", headers={"Accept": ACTIVITY_JSON})
            article = response.json()
    first, second = article["attachment"]
    assert first["type"] == second["type"] == "Image"
    assert (first["name"], first["mediaType"]) == ("A cat on a red sofa", "image/jpeg")
    assert (first["width"], first["height"]) == (1500, 2000)
    assert first["url"].startswith("https://blog.example/media/")
    assert first["url"].endswith("-1500.jpg")
    assert (second["name"], second["mediaType"]) == ("A map of the walk", "image/png")
    assert (second["width"], second["height"]) == (300, 200)
    assert article["image"] == {
        "type": "Image",
        "url": "https://cdn.example/cover.jpg",
        "name": "The sofa, from above",
    }


@pytest.mark.anyio
async def test_the_delivered_create_carries_the_attachments_to_followers(tmp_path: Path) -> None:
    world = World(tmp_path, media_dir=tmp_path / "media")
    png(tmp_path / "a.png")
    path = post_file(tmp_path, "![A green square](a.png)", image="/static/avatar.png")

    async with world.client, world.blog() as services:
        fake = world.fake("mastodon.test")
        await world.follow(fake.add_account("asonix"))
        await services.deliverer.deliver_once()
        fake.forget_traffic()
        draft = await services.blog.import_images(read_post_file(path), path)
        await services.blog.publish(draft)
        assert await services.deliverer.deliver_once() == 1
    (create,) = fake.deliveries
    assert create.valid
    note = create.activity["object"]
    (attachment,) = note["attachment"]
    assert attachment["name"] == "A green square"
    assert attachment["mediaType"] == "image/png"
    assert attachment["url"].startswith("https://blog.example/media/")
    assert note["image"] == {"type": "Image", "url": note["image"]["url"]}  # no image_alt
    # In the content too, the image's URLs are absolute.
    assert 'src="https://blog.example/media/' in note["content"]
    assert "/media/" not in note["content"].replace("https://blog.example/media/", "")


def _bomb(path: Path) -> Path:
    # More pixels than MAX_PIXELS, in a few kilobytes: a 1-bit PNG of one colour.
    side = int((MAX_PIXELS * 1.3) ** 0.5)
    Image.new("1", (side, side)).save(path, "PNG")
    return path


def _big_photo(path: Path) -> Path:
    phone_photo(path, (64, 48))
    with path.open("r+b") as handle:  # a 50 MB file (sparse: cheap to make)
        handle.truncate(50_000_000)
    return path


def _svg(path: Path) -> Path:
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    return path


def _text(path: Path) -> Path:
    path.write_text("not a picture at all")
    return path


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("missing.jpg", None, "cannot read it"),
        ("notes.png", _text, "not an image"),
        ("bomb.png", _bomb, "megapixels"),
        ("big.jpg", _big_photo, "more than 20 MB"),
        ("logo.svg", _svg, "SVG is not accepted"),
    ],
)
def test_a_bad_image_is_one_line_and_stores_no_post(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], name: str, make: Any, message: str
) -> None:
    run(capsys, "init")
    png(blog_dir / "fine.png")
    if make is not None:
        make(blog_dir / name)
    path = post_file(blog_dir, f"![fine](fine.png)\n\n![bad]({name})")

    code, _, err = run(capsys, "post", "new", str(path))

    assert code == 1
    assert message in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert run(capsys, "post", "list")[1].strip() == "no posts yet"
    assert media_files(blog_dir) == []  # the good image was not stored either
    assert run(capsys, "media", "list")[1].strip() == "no images yet"


def test_an_image_without_alt_text_is_published_with_a_warning(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    png(blog_dir / "a.png")
    path = post_file(blog_dir, "![](a.png)")

    code, out, err = run(capsys, "post", "new", str(path))

    assert code == 0
    assert out.startswith("published")
    assert err == f"fediblog: warning: {path}: the image a.png has no alt text\n"


def test_prune_deletes_the_images_no_post_uses_and_keeps_the_others(
    blog_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "init")
    png(blog_dir / "old.png", colour="red")
    png(blog_dir / "new.png", colour="blue")
    png(blog_dir / "kept.png", (1000, 500), colour="white")
    run(capsys, "post", "new", str(post_file(blog_dir, "![old](old.png)")))
    run(capsys, "post", "new", str(post_file(blog_dir, "![kept](kept.png)", title="Kept")))
    edit = post_file(blog_dir, "![new](new.png)", name="edit.md")
    assert run(capsys, "post", "edit", "photos", str(edit))[0] == 0
    before = media_files(blog_dir)
    assert len(before) == 1 + 1 + 3  # kept.png: 480, 960 and 1000 wide

    code, listing, _ = run(capsys, "media", "list")
    assert code == 0
    lines = listing.splitlines()
    assert len(lines) == 3
    assert sum("(unused)" in line for line in lines) == 1
    assert any("image/png" in line and line.endswith("  kept") for line in lines)
    assert any(line.endswith("  photos") for line in lines)

    orphan = f"{prepare_image(blog_dir / 'old.png').image.hash}-300.png"
    assert orphan in before
    orphan_bytes = (blog_dir / "data" / "media" / orphan).stat().st_size
    code, out, _ = run(capsys, "media", "prune")
    assert code == 0
    assert out.strip() == f"pruned 1 unused image, {orphan_bytes:,} bytes freed"
    after = media_files(blog_dir)
    assert len(after) == 4
    assert orphan not in after
    assert "(unused)" not in run(capsys, "media", "list")[1]
    assert run(capsys, "media", "prune")[1].strip() == "pruned 0 unused images, 0 bytes freed"


@pytest.mark.anyio
async def test_the_avatar_is_the_actors_icon_and_a_change_sends_one_update(
    tmp_path: Path,
) -> None:
    first = png(tmp_path / "me.png", (400, 400), colour="orange")
    header = png(tmp_path / "header.png", (1800, 600), colour="navy")
    world = World(tmp_path, media_dir=tmp_path / "media", description="I write about cats.")
    async with world.client:
        async with world.blog() as services:
            fake = world.fake("mastodon.test")
            await world.follow(fake.add_account("asonix"))
            await services.deliverer.deliver_once()
        fake.forget_traffic()

        world.settings = replace(world.settings, avatar=str(first), header=str(header))
        for _ in range(2):  # the second start finds nothing changed: nothing sent
            async with world.blog() as services:
                await services.deliverer.deliver_once()
        (update,) = fake.deliveries
        assert update.valid
        assert update.activity["type"] == "Update"
        icon = update.activity["object"]["icon"]
        assert icon["mediaType"] == "image/png"
        assert (icon["width"], icon["height"]) == (400, 400)
        assert update.activity["object"]["image"]["url"].endswith("-1600.png")

        second = png(tmp_path / "me2.png", (400, 400), colour="purple")
        world.settings = replace(world.settings, avatar=str(second))
        fake.forget_traffic()
        async with world.blog() as services:
            await services.deliverer.deliver_once()
            web = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=world.internet.hosts[world.settings.host]),
                base_url="https://" + world.settings.host,
            )
            async with web:
                actor = (
                    await web.get(services.urls.actor, headers={"Accept": ACTIVITY_JSON})
                ).json()
                about = soup((await web.get("/about")).text)
                served = await web.get(actor["icon"]["url"])
        (update,) = fake.deliveries
        assert update.activity["object"]["icon"] == actor["icon"]
        assert update.activity["object"]["icon"]["url"] != icon["url"]
        assert served.status_code == 200
        assert served.headers["content-type"] == "image/png"
        avatar = about.select_one("img.about-avatar")
        assert avatar is not None
        assert actor["icon"]["url"].endswith(str(avatar["src"]))
        assert about.select_one("img.about-header") is not None
        bio = about.select_one(".bio")
        assert bio is not None
        assert bio.get_text() == "I write about cats."


def test_serve_refuses_an_svg_avatar_with_one_line(
    blog_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(capsys, "init")
    monkeypatch.setenv("FEDIBLOG_AVATAR", str(_svg(blog_dir / "me.svg")))

    code, _, err = run(capsys, "serve")

    assert code == 1
    assert "SVG is not accepted" in err
    assert err.count("\n") == 1


@pytest.mark.anyio
async def test_images_already_stored_are_not_written_again(tmp_path: Path, settings: Any) -> None:
    settings = make_settings(tmp_path, media_dir=tmp_path / "media", keys_dir=settings.keys_dir)
    png(tmp_path / "a.png")
    async with running(settings) as app:
        services: Services = app.state.services
        media = MediaStore(settings, services.store)
        image = await media.import_file(tmp_path / "a.png")
        stored = tmp_path / "media" / f"{image.hash}-300.png"
        stamp = stored.stat().st_mtime_ns
        os.utime(stored, ns=(stamp - 10_000_000_000, stamp - 10_000_000_000))
        again = await media.import_file(tmp_path / "a.png")
    assert again == image
    assert stored.stat().st_mtime_ns == stamp - 10_000_000_000


@pytest.mark.anyio
async def test_feeds_carry_absolute_image_urls(tmp_path: Path) -> None:
    """Feed readers get /media/ URLs they can load: absolute, as servers get them."""
    settings = make_settings(tmp_path)
    async with running(settings) as app:
        ctx: Services = app.state.services
        folder = tmp_path / "post"
        folder.mkdir()
        Image.new("RGB", (600, 400), (10, 20, 30)).save(folder / "a.png")
        source = folder / "post.md"
        source.write_text("---\ntitle: Pictures\n---\n![A square](a.png)\n")
        draft = await ctx.blog.import_images(read_post_file(source), source)
        await ctx.blog.publish(draft)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=BASE_URL
        ) as web:
            atom = (await web.get("/feed.xml")).text
            feed = (await web.get("/feed.json")).json()
    relative = '="/media/'
    assert f"{BASE_URL}/media/" in atom
    assert relative not in atom.replace("&#34;", '"')
    content = feed["items"][0]["content_html"]
    assert f'src="{BASE_URL}/media/' in content
    assert relative not in content


@pytest.mark.anyio
async def test_a_new_title_or_bio_sends_one_update_of_the_profile(tmp_path: Path) -> None:
    """Followers' servers keep the blog's profile: a changed title (or bio, or anything
    else in the actor) reaches them as exactly one Update; a restart with nothing
    changed sends nothing."""
    world = World(tmp_path, media_dir=tmp_path / "media", title="Cats")
    async with world.client:
        async with world.blog() as services:
            fake = world.fake("mastodon.test")
            await world.follow(fake.add_account("asonix"))
            await services.deliverer.deliver_once()
        fake.forget_traffic()
        async with world.blog() as services:  # nothing changed
            await services.deliverer.deliver_once()
        assert fake.deliveries == []

        world.settings = replace(world.settings, title="Cats and charts")
        for _ in range(2):  # the second start finds nothing new: nothing sent
            async with world.blog() as services:
                await services.deliverer.deliver_once()

    (update,) = fake.deliveries
    assert update.valid
    assert update.activity["type"] == "Update"
    assert update.activity["object"]["name"] == "Cats and charts"
