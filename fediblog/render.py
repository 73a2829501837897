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
from functools import lru_cache

import nh3
from markdown_it import MarkdownIt
from mdit_py_plugins.footnote import footnote_plugin

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
    "img": {"src", "alt", "width", "height", "loading"},
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
    # "commonmark" with tables and strikethrough; raw HTML is allowed in, and then
    # sanitized out, so authors can use <details>, <kbd>, <sup> and friends.
    return (
        MarkdownIt("commonmark", {"html": True, "linkify": False, "typographer": False})
        .enable(["table", "strikethrough"])
        .use(footnote_plugin)
    )


def markdown_to_html(source: str) -> str:
    """Render an author's Markdown to sanitized HTML."""
    return sanitize_post_html(_markdown().render(source))


def sanitize_post_html(fragment: str) -> str:
    return nh3.clean(
        fragment,
        tags=set(POST_TAGS),
        attributes=POST_ATTRIBUTES,
        url_schemes=set(URL_SCHEMES),
        link_rel="noopener",
        strip_comments=True,
    )


def html_to_text(fragment: str) -> str:
    """The visible text of an HTML fragment, whitespace folded."""
    text = nh3.clean(fragment, tags=set())
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
