"""Post files: front matter parsing and validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from fediblog.blog import parse_post, read_post_file
from fediblog.errors import PostError


def test_full_front_matter() -> None:
    draft = parse_post(
        "---\n"
        "title: '  Hello,   World  '\n"
        "slug: hello\n"
        "summary: A summary.\n"
        "tags: [Python, '#Fediverse', python]\n"
        "published: 2026-11-28T10:00:00+01:00\n"
        "image: https://img.example/a.png\n"
        "---\n"
        "Body *here*.\n"
    )
    assert draft.title == "Hello, World"
    assert draft.slug == "hello"
    assert draft.summary == "A summary."
    assert draft.tags == ("python", "fediverse")
    assert draft.published == datetime(2026, 11, 28, 9, 0, tzinfo=UTC)
    assert draft.image == "https://img.example/a.png"
    assert draft.body_md == "Body *here*.\n"


def test_minimal_front_matter_makes_slug_from_title() -> None:
    draft = parse_post("---\ntitle: Ça marche, déjà!\ntags: a, b\npublished: 2026-01-02\n---\nx")
    assert draft.slug == "ca-marche-deja"
    assert not draft.slug_given
    assert draft.tags == ("a", "b")
    assert draft.published == datetime(2026, 1, 2, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no front matter at all", "needs a title"),
        ("---\nsummary: x\n---\nbody", "needs a title"),
        ("---\ntitle: ''\n---\nbody", "needs a title"),
        ("---\ntitle: [a\n---\nbody", "not valid YAML"),
        ("---\ntitle: T\nslug: Not A Slug\n---\n", "slug must be"),
        ("---\ntitle: T\ntitel: typo\n---\n", "unknown front matter key"),
        ("---\ntitle: T\npublished: someday\n---\n", "published must be a date"),
        ("---\ntitle: T\ntags: {a: 1}\n---\n", "tags must be"),
        ("---\ntitle: T\nimage: javascript:alert(1)\n---\n", "image must be"),
        ("---\ntitle: '!!!'\n---\n", "no slug can be made"),
    ],
)
def test_bad_post_files_are_one_clear_line(text: str, message: str) -> None:
    with pytest.raises(PostError, match=message) as caught:
        parse_post(text)
    assert "\n" not in str(caught.value)


def test_unreadable_or_binary_files(tmp_path: Path) -> None:
    with pytest.raises(PostError, match="cannot read"):
        read_post_file(tmp_path / "missing.md")
    binary = tmp_path / "binary.md"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PostError, match="not UTF-8"):
        read_post_file(binary)
