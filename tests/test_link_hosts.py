"""Links and image addresses read as a browser reads them (the WHATWG URL standard).

The link-host note (ATTACKS.md 33) shows the host a link really opens when its text
names another. urllib and browsers disagree on hostile URLs ("https://evil.example\\@
bank.example/" is evil.example to a browser); every case here states what a browser
does, and checks it against ada (the WHATWG parser Node.js uses) before checking us.
A post's cover image must be an http(s) URL or a path on this blog, as a browser
resolves it: "//evil.example/x.png" starts with "/" and is not on this blog.
"""

from __future__ import annotations

import html
import json

import ada_url
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fediblog import render
from fediblog.blog import parse_post
from fediblog.errors import PostError
from fediblog.render import blog_path, link_host, local_images, sanitize_remote_html, web_url
from fediblog.web.deps import Services
from tests.conftest import deliver
from tests.fediverse import FIXTURES, Fediverse
from tests.helpers import publish, soup

TEXT = "https://bank.example/login"

# (href as a remote server sends it, the host a browser opens: ada's and the note's)
HOSTILE_LINKS = [
    ("https://evil.example\\@bank.example/login", "evil.example"),  # backslash ends the host
    ("https:/\\evil.example/", "evil.example"),  # "\" is "/" in http(s) URLs
    ("https:\\\\evil.example/", "evil.example"),
    ("ht\ttps://evil.example/", "evil.example"),  # tabs and newlines are dropped...
    ("htt\nps://evil.example/", "evil.example"),
    ("https://evil.ex\tample/", "evil.example"),  # ...anywhere, the host too
    ("https://bank.example@evil.example/", "evil.example"),  # userinfo
    ("https://bank.example:pw@evil.example/", "evil.example"),
    ("https://b\u00e4nk.example/", "xn--bnk-qla.example"),  # IDN: shown in punycode
    ("https://b\u0430nk.example/", "xn--bnk-6cd.example"),  # Cyrillic a
    ("https://BANK.EXAMPLE\u3002evil.example/", "bank.example.evil.example"),  # ideographic dot
    ("https://evil%2Eexample/", "evil.example"),  # percent-encoded host
    ("https://ev%69l.example/", "evil.example"),
    ("//evil.example/login", "evil.example"),  # protocol-relative
    ("/\\evil.example/login", "evil.example"),
    ("\\\\evil.example/login", "evil.example"),
    (" https://evil.example/", "evil.example"),  # leading space
    ("https://0x7f.1/", "127.0.0.1"),  # IPv4 in hex
]


@pytest.mark.parametrize(("href", "opens"), HOSTILE_LINKS)
def test_the_parser_agrees_with_what_a_browser_opens(href: str, opens: str) -> None:
    assert ada_url.URL(href, base="https://blog.example/").hostname == opens
    assert link_host(href) == opens


@pytest.mark.parametrize(("href", "opens"), HOSTILE_LINKS)
def test_a_hostile_link_gets_the_host_a_browser_opens(href: str, opens: str) -> None:
    page = soup(sanitize_remote_html(f'<p><a href="{html.escape(href)}">{TEXT}</a></p>'))

    assert [span.get_text() for span in page.select("span.link-host")] == [f"[{opens}]"]


@pytest.mark.parametrize(
    "href",
    [
        "https://bank.example/login",
        "https://b%61nk.example/login",  # percent-encoded, but bank.example to a browser
        "https://evil.example%2F@bank.example/login",  # "evil.example/" is the user name
        "https://BANK.example./login",
        "https://www.bank.example/login",
        "htt\tps://bank.example/login",
    ],
)
def test_a_link_that_opens_the_host_it_shows_gets_no_note(href: str) -> None:
    assert link_host(href) in ("bank.example", "bank.example.", "www.bank.example")
    page = soup(sanitize_remote_html(f'<p><a href="{html.escape(href)}">{TEXT}</a></p>'))

    assert page.select("span.link-host") == []


@pytest.mark.parametrize(
    ("href", "shown"),
    [
        ("javascript:alert(1)", "no link"),
        (" javascript:alert(1)", "no link"),
        ("java\tscript:alert(1)", "no link"),
        ("java\nscript:alert(1)", "no link"),
        ("JaVaScRiPt:alert(1)", "no link"),
        ("/login", "this blog"),  # relative: it opens this blog, not bank.example
    ],
)
def test_links_that_open_no_host_say_so(href: str, shown: str) -> None:
    page = soup(sanitize_remote_html(f'<p><a href="{html.escape(href)}">{TEXT}</a></p>'))

    assert [span.get_text() for span in page.select("span.link-host")] == [f"[{shown}]"]
    for link in page.find_all("a"):
        assert "script" not in str(link.get("href", "")).lower()


def test_the_text_side_reads_hosts_as_a_browser_would() -> None:
    # faß.example is xn--fa-hia.example to browsers (UTS 46, not IDNA 2003's fass).
    anchor = '<a href="https://fa\u00df.example/">https://fa\u00df.example/</a>'
    assert soup(sanitize_remote_html(anchor)).select("span.link-host") == []
    # A backslash in the text ends the host a reader sees, as in the href.
    anchor = '<a href="https://evil.example/">https://bank.example\\evil.example/</a>'
    hosts = soup(sanitize_remote_html(anchor)).select("span.link-host")
    assert [h.get_text() for h in hosts] == ["[evil.example]"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://127.0.0.1/", "127.0.0.1"),  # an IP address is a host too
        ("https://[::1]/admin", "[::1]"),
        ("https://bank%2eexample/login", "bank.example"),  # browsers decode the escape
        ("https://BANK.example/", "bank.example"),
    ],
)
def test_hosts_only_a_url_can_name_are_read_from_the_text(text: str, shown: str) -> None:
    assert str(ada_url.URL(text).hostname) == shown  # what a browser reads in the text
    anchor = f'<a href="https://evil.example/">{html.escape(text)}</a>'
    hosts = soup(sanitize_remote_html(anchor)).select("span.link-host")
    assert [h.get_text() for h in hosts] == ["[evil.example]"]
    honest = f'<a href="{html.escape(text)}">{html.escape(text)}</a>'
    assert soup(sanitize_remote_html(honest)).select("span.link-host") == []


@pytest.mark.anyio
async def test_a_backslash_link_in_a_reply_shows_its_host_on_the_page(
    web: httpx.AsyncClient, ctx: Services, fediverse: Fediverse
) -> None:
    post = await publish(ctx, "Backslashes")
    mallory = fediverse.add("evil.example", "mallory", key_index=0)
    content = (
        'Your <a href="https://evil.example\\@bank.example/login">https://bank.example/login</a>'
        ' and <a href="https:/\\evil.example/">https://bank.example/</a> need you'
    )
    note = mallory.note(1, ctx.blog.object_id(post.uid), content)
    await deliver(web, ctx, mallory, mallory.create(note))

    page = soup((await web.get(f"/posts/{post.slug}")).text)

    links = page.select("#responses .e-content a")
    assert [a.find_next_sibling("span", class_="link-host").get_text() for a in links] == [
        "[evil.example]",
        "[evil.example]",
    ]


# ---- cover images ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        "//evil.example/x.png",
        "/\\evil.example/x.png",
        "\\\\evil.example/x.png",
        "/\t/evil.example/x.png",
        "/\n/evil.example/x.png",
        "/..//evil.example/x.png",  # dot-segments that leave "//evil.example/…"
        "/.//evil.example/x.png",
        "/a/..//evil.example/x.png",
        "/%2e%2e//evil.example/x.png",
        "https://user@evil.example/x.png",  # a user name only hides the host
        " javascript:alert(1)",
        "java\tscript:alert(1)",
        "data:image/png;base64,AAAA",
        "x.png",  # relative to what? say "/x.png"
        "ftp://files.example/x.png",
    ],
)
def test_a_cover_image_that_leaves_the_blog_in_disguise_is_refused(image: str) -> None:
    with pytest.raises(PostError, match="image must be an http"):
        parse_post(f"---\ntitle: T\nimage: {_yaml(image)}\n---\nbody")


@pytest.mark.parametrize(
    ("image", "kept"),
    [
        ("/media/cover.png", "/media/cover.png"),
        ("/media/a cover.png", "/media/a%20cover.png"),  # as the browser asks for it
        ("https://img.example/a.png", "https://img.example/a.png"),
        ("https://b\u00fccher.example/a.png", "https://xn--bcher-kva.example/a.png"),
        ("https:\\\\img.example\\a.png", "https://img.example/a.png"),  # what a browser loads
    ],
)
def test_a_cover_image_is_kept_as_a_browser_requests_it(image: str, kept: str) -> None:
    assert ada_url.URL(image, base="https://blog.example/").href.endswith(kept)
    draft = parse_post(f"---\ntitle: T\nimage: {_yaml(image)}\n---\nbody")

    assert draft.image == kept


@pytest.mark.anyio
async def test_a_protocol_relative_cover_never_reaches_the_page(
    web: httpx.AsyncClient, ctx: Services
) -> None:
    with pytest.raises(PostError):
        await publish(ctx, "Cover", image='"//evil.example/x.png"')
    post = await publish(ctx, "Cover", image='"/media/cover.png"')

    page = soup((await web.get(f"/posts/{post.slug}")).text)

    assert page.select_one("img.cover")["src"] == "/media/cover.png"
    assert "evil.example" not in str(page)


def test_the_helpers_say_what_is_on_this_blog() -> None:
    assert blog_path("/a?b#c") == "/a?b#c"
    assert blog_path("//evil.example/") is None
    assert blog_path("https://blog.example/a") is None  # a URL, not a path
    assert web_url("https://bank.example@evil.example/") is None
    assert web_url("https://evil.example\\@bank.example/") == "https://evil.example/@bank.example/"
    # Markdown images: files next to the post are imported; the rest are addresses.
    assert local_images("![a](img/a.png) ![b](//evil.example/b.png) ![c](/c.png)") == [
        ("img/a.png", "img/a.png")
    ]


def _yaml(value: str) -> str:
    """A YAML double-quoted scalar holding ``value`` exactly (tabs, newlines, "\\")."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\t", "\\t").replace("\n", "\\n") + '"'


# ---- ammonia's output read without HTMLParser (render._serialized_tokens) --------------

_HOSTS = ["bank.example", "evil.example", "xn--bnk-sna.example", "b\u0430nk.example", "127.0.0.1"]
_MARKUP = st.sampled_from(
    [
        '<a href="https://bank.example/">', '<a href="https://evil.example/x?a=1&b=2">',
        "<a href='//evil.example'>", '<a href="javascript:alert(1)">', '<a href="/here">',
        '<a href="https://evil.example/" class="mention u-url" title="x>y">', "</a>",
        "<p>", "</p>", "<br>", "<br/>", "<span class=\"h-card\">", "</span>", "<img src=x>",
        "<script>alert(1)</script>", "<!-- a comment -->", "<b>", "</i>", "<ol reversed>",
        "&amp;", "&", "&lt;", "<", ">", '"', "'", "&nbsp;", "\u00a0", "&#x3a;", ":blob:",
        ":nope:", "@", "https://", " ", "\n", "\t", "<li value=\"3\">", "<pre>", "</pre>",
        *_HOSTS,
    ]
)  # fmt: skip


def _through_htmlparser(fragment: str, emoji: dict[str, str]) -> str:
    rewriter = render._TextRewriter(emoji)
    rewriter.feed(fragment)
    rewriter.close()
    return "".join(rewriter._out)


@given(pieces=st.lists(st.one_of(_MARKUP, st.text(max_size=6)), max_size=40))
@settings(max_examples=500, deadline=None, derandomize=True)
def test_ammonia_s_output_reads_the_same_without_htmlparser(pieces: list[str]) -> None:
    """Sanitized content is re-read with two expressions instead of HTMLParser; on
    whatever ammonia writes, both give the same page (links' real hosts, emoji)."""
    emoji = {"blob": "https://cdn.example/blob.png"}
    cleaned = render._REMOTE_CLEANER.clean(render.strip_invisible("".join(pieces)))
    assert render._serialized_tokens(cleaned) is not None, cleaned  # the fast way applies
    assert render._TextRewriter(emoji).rewrite(cleaned) == _through_htmlparser(cleaned, emoji)


def test_every_fixture_s_content_reads_the_same_without_htmlparser() -> None:
    contents = []
    for path in sorted(FIXTURES.rglob("*.json")):
        contents.extend(_contents(json.loads(path.read_text())))
    assert len(contents) > 20
    for content in contents:
        cleaned = render._REMOTE_CLEANER.clean(render.strip_invisible(content))
        assert render._serialized_tokens(cleaned) is not None, cleaned
        assert render._TextRewriter({}).rewrite(cleaned) == _through_htmlparser(cleaned, {})


def _contents(document: object) -> list[str]:
    """Every "content" string anywhere in a JSON document."""
    if isinstance(document, dict):
        found = [v for k, v in document.items() if k == "content" and isinstance(v, str)]
        return found + [c for v in document.values() for c in _contents(v)]
    if isinstance(document, list):
        return [c for v in document for c in _contents(v)]
    return []
