"""Text to safe HTML: Markdown for posts, allowlist sanitizing, plain-text excerpts.

Pure: no network, no database. Markdown goes through markdown-it-py and the result
through nh3 (ammonia), whatever its source: the author's own posts are sanitized
too, so a pasted snippet can never carry a script into a reader's browser or into
a follower's timeline.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

import ada_url
import nh3

from fediblog.models import MediaImage

if TYPE_CHECKING:  # markdown-it itself is imported when a post is first rendered
    from markdown_it import MarkdownIt
    from markdown_it.renderer import RendererHTML
    from markdown_it.token import Token
    from markdown_it.utils import OptionsDict

# What an author's post may contain after rendering. Generous for writing,
# nothing that runs: no script, style, iframe, form or event-handler attributes.
POST_TAGS = frozenset(
    {
        "a", "abbr", "b", "blockquote", "br", "code", "del", "details", "dd", "div", "dl",
        "dt", "em", "figcaption", "figure", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i",
        "img", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s", "section", "small",
        "span", "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th",
        "thead", "tr", "u", "ul",
    }
)  # fmt: skip
POST_ATTRIBUTES: dict[str, set[str]] = {
    "*": {"id", "title", "lang", "dir"},
    "a": {"href"},
    "img": {"src", "srcset", "sizes", "alt", "width", "height", "loading"},
    "ol": {"start", "reversed"},
    "td": {"colspan", "rowspan", "align"},
    "th": {"colspan", "rowspan", "align", "scope"},
    "code": {"class"},
    "span": {"class"},
    "div": {"class"},
    "section": {"class"},
    "li": {"class"},
    "sup": {"class"},
}
URL_SCHEMES = frozenset({"http", "https", "mailto"})

_WHITESPACE = re.compile(r"\s+")


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    # Imported here: only the author's writing needs it, neither a reader's page nor the
    # inbox does (0.7 MB of each process's memory, 60 modules).
    from markdown_it import MarkdownIt
    from mdit_py_plugins.footnote import footnote_plugin

    # "commonmark" with tables and strikethrough; raw HTML is allowed in, and then
    # sanitized out, so authors can use <details>, <kbd>, <sup> and friends.
    md = (
        MarkdownIt("commonmark", {"html": True, "linkify": False, "typographer": False})
        .enable(["table", "strikethrough"])
        .use(footnote_plugin)
    )
    md.add_render_rule("image", _render_image)
    return md


def markdown_to_html(source: str, images: Mapping[str, MediaImage] | None = None) -> str:
    """Render an author's Markdown to sanitized HTML. ``images`` maps an image's src,
    as written, to its copy in the media store (media.py): that image is shown from
    there, in every size, with its dimensions."""
    return sanitize_post_html(_markdown().render(source, {"media": images or {}}))


# The widest the text column shows an image (style.css --measure, with margins).
IMAGE_SIZES = "(max-width: 45rem) 100vw, 45rem"


def _render_image(
    renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: Any
) -> str:
    token = tokens[idx]
    image = env.get("media", {}).get(_image_src(token))
    if image is None:
        return renderer.image(tokens, idx, options, env)
    alt = renderer.renderInlineAsText(token.children or [], options, env)
    return media_img(image, alt, title=token.attrGet("title"))


def media_img(image: MediaImage, alt: str, *, title: str | int | float | None = None) -> str:
    """An <img> of a stored image: the variant nearest the column's width as src, all of
    them in srcset, the largest's dimensions (the page's CSS scales it down)."""
    width, height = image.largest
    src = max((w for w, _ in image.variants if w <= 960), default=image.variants[0][0])
    srcset = ", ".join(f"{image.path(w)} {w}w" for w, _ in image.variants)
    title_attr = f' title="{html.escape(str(title))}"' if title else ""
    return (
        f'<img src="{image.path(src)}" srcset="{srcset}" sizes="{IMAGE_SIZES}"'
        f' width="{width}" height="{height}" alt="{html.escape(alt)}"{title_attr}'
        ' loading="lazy">'
    )


def _image_src(token: Token) -> str:
    src = token.attrGet("src")
    return src if isinstance(src, str) else ""


def _image_tokens(tokens: Sequence[Token]) -> Iterator[Token]:
    for token in tokens:
        if token.type == "image":
            yield token
        if token.children:
            yield from _image_tokens(token.children)


def markdown_images(source: str) -> list[tuple[str, str]]:
    """(src as written, alt text) of every image in a post's Markdown, in order."""
    md = _markdown()
    renderer = cast("RendererHTML", md.renderer)  # MarkdownIt's own, as _markdown() keeps it
    found: list[tuple[str, str]] = []
    for token in _image_tokens(md.parse(source, {})):
        alt = renderer.renderInlineAsText(token.children or [], md.options, {})
        found.append((_image_src(token), alt))
    return found


def local_images(source: str) -> list[tuple[str, str]]:
    """(src as written, path relative to the post file) of each distinct image that is
    neither a URL nor a path on this blog: those are imported into the media store."""
    found: dict[str, str] = {}
    for src, _ in markdown_images(source):
        # As a browser reads it: "\\host/x.png" and "/\host/x.png" are on another host.
        url = browser_url(src)
        if (
            src
            and url is not None
            and url.host == _HERE_HOST
            and not ada_url.check_url(src)
            and not src.lstrip().startswith(("/", "\\", "#", "?"))
        ):
            found.setdefault(src, unquote(urlsplit(src).path))
    return list(found.items())


def images_without_alt(source: str) -> list[str]:
    """The src of each image in a post's Markdown that has no alt text."""
    return [src for src, alt in markdown_images(source) if not alt.strip()]


def sanitize_post_html(fragment: str) -> str:
    return _POST_CLEANER.clean(fragment)


def html_to_text(fragment: str) -> str:
    """The visible text of an HTML fragment, whitespace folded."""
    text = _TEXT_CLEANER.clean(fragment)
    return _WHITESPACE.sub(" ", html.unescape(text)).strip()


def excerpt(fragment: str, length: int = 280) -> str:
    """Plain text of at most ``length`` characters, cut at a word, for cards and lists."""
    text = html_to_text(fragment)
    if len(text) <= length:
        return text
    cut = text[: length - 1]
    space = cut.rfind(" ")
    if space > length // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.-") + "…"


_SLUG_DROP = re.compile(r"[^a-z0-9]+")


def slugify(title: str, max_length: int = 80) -> str:
    """A URL slug from a title: ascii, lower case, words joined by '-'."""
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = _SLUG_DROP.sub("-", ascii_title.lower()).strip("-")
    return slug[:max_length].rstrip("-")


def normalize_tag(tag: str) -> str:
    """Tags are compared and shown without '#', lower case, words joined by '-'."""
    return slugify(tag.lstrip("#"), max_length=64)


# ---- content from other servers --------------------------------------------------------

# Close to Mastodon's sanitizer (app/lib/sanitize_config.rb): text formatting, links,
# lists, quotes, code; no images or media inside text (attachments are shown apart,
# custom emoji are added after sanitizing), nothing that runs or styles.
REMOTE_TAGS = frozenset(
    {"p", "br", "span", "a", "del", "s", "pre", "blockquote", "code", "b", "strong", "u",
     "i", "em", "ul", "ol", "li", "sub", "sup", "h1", "h2", "h3", "h4", "h5", "h6"}
)  # fmt: skip
REMOTE_ATTRIBUTES: dict[str, set[str]] = {
    "a": {"href", "translate"},  # "class" is governed by REMOTE_CLASSES (ammonia's rule)
    "span": {"translate"},
    "ol": {"start", "reversed"},
    "li": {"value"},
}
REMOTE_CLASSES = {
    "a": {"mention", "hashtag", "u-url", "status-link"},
    "span": {"h-card", "invisible", "ellipsis", "mention", "hashtag"},
}
LINK_REL = "nofollow ugc noopener"

# Each sanitizer's rules, given to ammonia once: nh3.clean converts them from Python on
# every call, two thirds of its time for a reply (20 us instead of 7).
_POST_CLEANER = nh3.Cleaner(
    tags=set(POST_TAGS),
    attributes=POST_ATTRIBUTES,
    url_schemes=set(URL_SCHEMES),
    link_rel="noopener",
    strip_comments=True,
)
_TEXT_CLEANER = nh3.Cleaner(tags=set())
_REMOTE_CLEANER = nh3.Cleaner(
    tags=set(REMOTE_TAGS),
    attributes=REMOTE_ATTRIBUTES,
    allowed_classes=REMOTE_CLASSES,
    url_schemes={"http", "https"},
    link_rel=LINK_REL,
    strip_comments=True,
)

# Bidi overrides, zero-width characters and controls (but tab and line breaks) hide or
# reorder what a reader sees (ATTACKS.md 34): they never survive into a page.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
                        "\u00ad\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f"
                        "\u202a-\u202e\u2060-\u206f\u3164\ufeff\uffa0]")  # fmt: skip
_SHORTCODE = re.compile(r":([A-Za-z0-9_]{1,64}):")


def strip_invisible(text: str) -> str:
    return _INVISIBLE.sub("", text)


def sanitize_remote_html(fragment: str, emoji: Mapping[str, str] | None = None) -> str:
    """Sanitize HTML from another server; then put custom emoji in its text nodes only.

    ``emoji`` maps a shortcode (without colons) to an https image URL that the caller
    took from the same object's own ``tag`` list.
    """
    clean = _REMOTE_CLEANER.clean(strip_invisible(fragment))
    return _TextRewriter(emoji or {}).rewrite(clean)


def plain_to_html(text: str) -> str:
    """Plain text (a local comment) as escaped paragraphs; nothing in it is markup."""
    paragraphs = re.split(r"\n\s*\n", strip_invisible(text).strip().replace("\r\n", "\n"))
    return "".join(
        "<p>" + "<br>".join(html.escape(line) for line in p.split("\n")) + "</p>"
        for p in paragraphs
        if p.strip()
    )


def emoji_html(shortcode: str, url: str) -> str:
    name = html.escape(f":{shortcode}:")
    return (
        f'<img class="emoji" src="{html.escape(url)}" alt="{name}" title="{name}"'
        ' width="20" height="20" loading="lazy" referrerpolicy="no-referrer">'
    )


# ---- URLs as browsers read them ------------------------------------------------------

# Every URL check that stands between a page and a reader's browser parses as browsers
# do (the WHATWG URL standard, by ada, the parser Node.js uses), never with urllib:
# "https://evil.example\@bank.example/" is evil.example to a browser and bank.example to
# urlsplit; "https:/\evil.example/" and "//evil.example" leave the page's site.
# A relative reference is resolved against a base on a host no link can name (.invalid,
# RFC 6761): if it resolves elsewhere, it leaves the blog.
_HERE_HOST = "here.invalid"
_HERE = f"https://{_HERE_HOST}/"


def browser_url(ref: str) -> ada_url.URL | None:
    """``ref`` as a browser resolves it on one of this blog's pages (relative to the
    blog's host, here.invalid standing in for it), or None if a browser could not."""
    try:
        return ada_url.URL(ref, base=_HERE)
    except ValueError:
        return None


def web_url(ref: str) -> str | None:
    """``ref`` as a browser would request it, when it is an absolute http(s) URL with a
    host and no user name or password (which only serve to disguise the host); else None."""
    try:
        url = ada_url.URL(ref.strip())
    except ValueError:
        return None
    if url.protocol not in ("https:", "http:") or not url.hostname:
        return None
    if url.username or url.password:
        return None
    return str(url.href)


def blog_path(ref: str) -> str | None:
    """``ref`` as the path (with query and fragment) a browser requests from this blog
    when it starts with "/" and stays here; None when it is not such a path, such as
    ``//evil.example/x.png``, ``/\\evil.example/x.png`` or ``/\t/evil.example``."""
    ref = ref.strip()
    url = browser_url(ref)
    if not ref.startswith("/") or url is None or ada_url.check_url(ref):
        return None
    if url.host != _HERE_HOST or url.username or url.password:
        return None
    # Dot-segments can leave "//evil.example/x.png" ("/..//evil.example/x.png"): a
    # path that a browser, put back in a page, would read as another host.
    if url.pathname.startswith("//"):
        return None
    return f"{url.pathname}{url.search}{url.hash}"


def link_host(href: str) -> str | None:
    """The host a link to ``href`` on one of our pages opens, as a browser resolves it
    (lower case, IDN in punycode); "" when it stays on this blog; None when it opens no
    host at all (no URL, ``mailto:``, ``javascript:``)."""
    url = browser_url(href)
    if url is None or url.protocol not in ("https:", "http:"):
        return None
    host = str(url.hostname)
    return "" if host == _HERE_HOST else host


def _idna_host(name: str) -> str:
    """A host named in text as a browser would look it up (UTS 46, as ada does)."""
    try:
        found = ada_url.idna_to_ascii(name.lower())
    except (ValueError, UnicodeError):
        found = b""
    return found.decode("ascii", "replace") if found else name.lower()


# A host named in a link's text: any script (so a homoglyph is still a host), and the
# dots IDNA reads as "." ("bank。example" is bank.example to a browser).
_HOST_WORD = re.compile(r"(?:[^\W_]|-)+(?:\.(?:[^\W_]|-)+)*\.[^\W\d_]{2,}")
_IDNA_DOTS = str.maketrans("\u3002\uff0e\uff61", "...")
_AUTHORITY_END = re.compile(r"[/\\?#]")


def ascii_host(host: str) -> str:
    """A host as the browser resolves it: lower case, IDN in punycode."""
    host = host.lower().rstrip(".")
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        return host


def _shown_hosts(text: str) -> set[str]:
    """Every host a link's text shows: each word's authority (before any path), on
    both sides of an '@' (``https://bank.example@evil.example/``), "www." aside."""
    hosts: set[str] = set()
    for word in text.translate(_IDNA_DOTS).split():
        explicit = "://" in word
        authority = _AUTHORITY_END.split(word.split("://", 1)[-1], maxsplit=1)[0]
        for part in authority.split("@"):
            name = part.split(":", 1)[0].strip(".,;!?()[]<>\"'")
            if _HOST_WORD.fullmatch(name):
                hosts.add(_idna_host(name).rstrip(".").removeprefix("www."))
            elif explicit and (host := _url_host(part.strip(".,;!?()<>\"'"))):
                # What only a URL's syntax makes a host: an IP address ("https://127.0.0.1/",
                # "https://[::1]/") or percent-escapes ("https://bank%2eexample/").
                hosts.add(host.rstrip(".").removeprefix("www."))
    return hosts


def _url_host(authority: str) -> str | None:
    """The host a browser reads in ``https://AUTHORITY/``, if it has a dot or is an
    IPv6 address; None if a browser could not read it."""
    try:
        host = str(ada_url.URL(f"https://{authority}/").hostname)
    except ValueError:
        return None
    return host if "." in host or host.startswith("[") else None


# What ammonia writes (html5ever's serializer): lower-case names, every attribute as
# name="value", text and values with & and " escaped, "<" never raw in text, no
# comments. Read with these two expressions it needs no HTMLParser, which took half
# of sanitizing a reply (38 of 73 us); any other input goes to HTMLParser, and a test
# holds the two to the same output on generated HTML (tests/test_link_hosts.py).
_SERIALIZED_TOKEN = re.compile(
    r'<([a-z][a-z0-9]*)((?: [a-z][a-z0-9_:-]*="[^"]*")*)>|</([a-z][a-z0-9]*)>|([^<]+)'
)
_SERIALIZED_ATTRIBUTE = re.compile(r' ([a-z][a-z0-9_:-]*)="([^"]*)"')

# A start tag's name and attributes, an end tag's name, or text: one of the three.
_Token = tuple[str, list[tuple[str, str | None]], str, str]


def _serialized_tokens(fragment: str) -> list[_Token] | None:
    """The tokens of ammonia's output, values and text unescaped as HTMLParser does
    (``convert_charrefs``); None if ``fragment`` is not wholly made of them."""
    tokens: list[_Token] = []
    position, size = 0, len(fragment)
    while position < size:
        found = _SERIALIZED_TOKEN.match(fragment, position)
        if found is None:
            return None
        start, attributes, end, text = found.groups()
        if start:
            pairs = _SERIALIZED_ATTRIBUTE.findall(attributes)
            tokens.append((start, [(k, html.unescape(v)) for k, v in pairs], "", ""))
        elif end:
            tokens.append(("", [], end, ""))
        else:
            tokens.append(("", [], "", html.unescape(text)))
        position = found.end()
    return tokens


class _TextRewriter(HTMLParser):
    """Re-emits sanitized HTML, changing only what its text shows.

    * ``:shortcode:`` in a text node becomes that emoji's image. Working on parsed text
      nodes, not on the markup, means a shortcode inside an attribute, such as a
      link's title, can never become an element (ATTACKS.md 32).
    * A link whose text names another host than its target (anywhere in its text,
      homoglyphs and ``user@host`` included) gets the real host shown after it, in
      punycode (ATTACKS.md 33), the host a browser opens (``link_host``), so that
      backslashes, tabs, user names and percent-escapes cannot hide it.
    """

    def __init__(self, emoji: Mapping[str, str]) -> None:
        super().__init__(convert_charrefs=True)
        self._emoji = emoji
        self._out: list[str] = []
        self._in_link = False
        self._link_host: str | None = None  # of the <a> we are in (link_host)
        self._link_text: list[str] = []

    def rewrite(self, fragment: str) -> str:
        tokens = _serialized_tokens(fragment)
        if tokens is None:
            self.feed(fragment)
            self.close()
        else:
            for start, attributes, end, text in tokens:
                if start:
                    self.handle_starttag(start, attributes)
                elif end:
                    self.handle_endtag(end)
                else:
                    self.handle_data(text)
        return "".join(self._out)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            self._in_link = True
            self._link_host = link_host(href) if href else None
            self._link_text = []
        self._out.append(self._tag(tag, attrs, "/>" if tag == "br" else ">"))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._out.append(self._tag(tag, attrs, ">"))

    def handle_endtag(self, tag: str) -> None:
        self._out.append(f"</{tag}>")
        if tag == "a" and self._in_link:
            real = (self._link_host or "").rstrip(".").removeprefix("www.")
            shown = _shown_hosts("".join(self._link_text))
            if any(other != real for other in shown):
                host = html.escape(
                    "no link" if self._link_host is None else self._link_host or "this blog"
                )
                self._out.append(f' <span class="link-host">[{host}]</span>')
            self._in_link = False

    def handle_data(self, data: str) -> None:
        if self._in_link:
            self._link_text.append(data)
        pieces = _SHORTCODE.split(data)
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                self._out.append(html.escape(piece, quote=False))
            elif piece in self._emoji:
                self._out.append(emoji_html(piece, self._emoji[piece]))
            else:
                self._out.append(html.escape(f":{piece}:", quote=False))

    @staticmethod
    def _tag(tag: str, attrs: list[tuple[str, str | None]], end: str) -> str:
        rendered = "".join(
            f' {name}="{html.escape(value or "", quote=True)}"' for name, value in attrs
        )
        return f"<{tag}{rendered}{'>' if end == '/>' else end}"
