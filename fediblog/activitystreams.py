"""ActivityStreams 2 JSON: what we publish (``build_*``) and how we read others (``parse_*``).

Pure: no network, no database. All ids are built here from the settings, so the
URL layout of the federation side is in one place:

    {base}/users/{handle}             the blog actor (Person or Service)
    {base}/users/{handle}#main-key    its key
    {base}/users/{handle}/inbox       personal inbox     {base}/inbox  shared inbox
    {base}/users/{handle}/outbox      /followers  /following
    {base}/actor                      the instance actor (signs outbound GETs)
    {base}/p/{uid}                    a post (Article or Note); stable across slug changes
    {base}/p/{uid}/activity           its Create        {base}/p/{uid}/replies
    {base}/p/{uid}/answers/{token}    the author's answer to a response under it (a Note)

Only well-known contexts plus inline term definitions are published (Fedify refuses
others). Inbound payloads are read as plain JSON: ``@context`` is never fetched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote, urlsplit

from fediblog.config import Settings
from fediblog.errors import ActivityError
from fediblog.models import (
    MEDIA_TYPES,
    AuthorAnswer,
    JsonObject,
    MediaImage,
    Mentioned,
    Post,
    Visibility,
    format_ts,
)
from fediblog.render import ascii_host, strip_invisible

AS_CONTEXT = "https://www.w3.org/ns/activitystreams"
SECURITY_CONTEXT = "https://w3id.org/security/v1"
PUBLIC = "https://www.w3.org/ns/activitystreams#Public"
PUBLIC_ALIASES = frozenset({PUBLIC, "as:Public", "Public"})
ACTIVITY_JSON = "application/activity+json"

_EXTENSIONS: JsonObject = {
    "manuallyApprovesFollowers": "as:manuallyApprovesFollowers",
    "sensitive": "as:sensitive",
    "Hashtag": "as:Hashtag",
    "toot": "http://joinmastodon.org/ns#",
    "discoverable": "toot:discoverable",
    "indexable": "toot:indexable",
    "featured": {"@id": "toot:featured", "@type": "@id"},
    "schema": "http://schema.org#",
    "PropertyValue": "schema:PropertyValue",
    "value": "schema:value",
}
ACTOR_CONTEXT: list[Any] = [AS_CONTEXT, SECURITY_CONTEXT, _EXTENSIONS]
OBJECT_CONTEXT: list[Any] = [AS_CONTEXT, _EXTENSIONS]

PAGE_SIZE = 20


@dataclass(frozen=True, slots=True)
class Urls:
    """Every federation URL of this blog."""

    base: str
    actor: str
    key_id: str
    inbox: str
    shared_inbox: str
    outbox: str
    followers: str
    following: str
    instance_actor: str
    instance_key_id: str

    @classmethod
    def of(cls, settings: Settings) -> Urls:
        actor = settings.url(f"/users/{settings.handle}")
        return cls(
            base=settings.base_url,
            actor=actor,
            key_id=f"{actor}#main-key",
            inbox=f"{actor}/inbox",
            shared_inbox=settings.url("/inbox"),
            outbox=f"{actor}/outbox",
            followers=f"{actor}/followers",
            following=f"{actor}/following",
            instance_actor=settings.url("/actor"),
            instance_key_id=settings.url("/actor#main-key"),
        )

    def object_id(self, uid: str) -> str:
        return f"{self.base}/p/{uid}"

    @property
    def featured(self) -> str:
        """The pinned posts' collection (Mastodon's ``toot:featured``)."""
        return f"{self.actor}/collections/featured"

    def post_url(self, slug: str) -> str:
        return f"{self.base}/posts/{slug}"

    def response_url(self, slug: str, comment_id: int) -> str:
        """A response's permalink: it redirects to whichever page of responses holds it."""
        return f"{self.base}/posts/{slug}/comments/{comment_id}"

    def tag_url(self, tag: str) -> str:
        return f"{self.base}/tags/{quote(tag)}"

    def answer_id(self, post_uid: str, token: str) -> str:
        return f"{self.base}/p/{post_uid}/answers/{token}"


# ---- what we publish ----------------------------------------------------------------


def build_actor(
    settings: Settings,
    public_key_pem: str,
    published: datetime,
    *,
    icon: MediaImage | None = None,
    header: MediaImage | None = None,
) -> JsonObject:
    """The blog actor; ``icon`` and ``header`` are FEDIBLOG_AVATAR and FEDIBLOG_HEADER as
    the media store keeps them (media.py), the default avatar otherwise."""
    urls = Urls.of(settings)
    document: JsonObject = {
        "@context": ACTOR_CONTEXT,
        "id": urls.actor,
        "type": settings.actor_type,
        "preferredUsername": settings.handle,
        "name": settings.title,
        "summary": f"<p>{_escape(settings.description)}</p>",
        "url": urls.base + "/",
        "icon": _image(urls, icon)
        if icon
        else {"type": "Image", "mediaType": "image/png", "url": urls.base + "/static/avatar.png"},
        "inbox": urls.inbox,
        "outbox": urls.outbox,
        "followers": urls.followers,
        "following": urls.following,
        "featured": urls.featured,
        "endpoints": {"sharedInbox": urls.shared_inbox},
        "manuallyApprovesFollowers": settings.manually_approves_followers,
        "discoverable": True,
        "indexable": True,
        "published": format_ts(published),
        "attachment": [
            {
                "type": "PropertyValue",
                "name": "Blog",
                "value": f'<a href="{urls.base}/" rel="me">{_escape(urls.base)}</a>',
            }
        ],
        "publicKey": {"id": urls.key_id, "owner": urls.actor, "publicKeyPem": public_key_pem},
    }
    if header:
        document["image"] = _image(urls, header)
    return document


def build_actor_update(settings: Settings, actor: JsonObject, updated: datetime) -> JsonObject:
    """The actor changed (its avatar or header): an Update with the whole new actor."""
    urls = Urls.of(settings)
    stamp = format_ts(updated)
    digest = _digest(str(actor.get("icon")) + str(actor.get("image")))[:8]
    return {
        "@context": ACTOR_CONTEXT,
        "id": f"{urls.actor}#updates/{int(updated.timestamp())}-{digest}",
        "type": "Update",
        "actor": urls.actor,
        "published": stamp,
        "to": [PUBLIC],
        "cc": [urls.followers],
        "object": {key: value for key, value in actor.items() if key != "@context"},
    }


def _image(urls: Urls, image: MediaImage) -> JsonObject:
    """A stored image (media.py) as an AS2 Image: its largest variant, absolute."""
    width, height = image.largest
    return {
        "type": "Image",
        "mediaType": image.media_type,
        "url": urls.base + image.path(width),
        "width": width,
        "height": height,
    }


class _MediaImages(HTMLParser):
    """The images of a post's HTML that come from the media store: markup we rendered
    ourselves (render.media_img), read back so every path to the Article agrees."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[JsonObject] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag != "img":
            return
        values = {name: value or "" for name, value in attrs}
        candidates = [part.split() for part in values.get("srcset", "").split(",")]
        widest = max(
            (c for c in candidates if len(c) == 2 and c[1].endswith("w") and c[1][:-1].isdigit()),
            key=lambda c: int(c[1][:-1]),
            default=[values.get("src", "")],
        )
        path = widest[0]
        kind = MEDIA_TYPES.get(path.rsplit(".", 1)[-1])
        if not path.startswith("/media/") or kind is None:
            return
        image: JsonObject = {"type": "Image", "mediaType": kind, "url": "", "name": ""}
        image["url"], image["name"] = path, values.get("alt", "")
        for key in ("width", "height"):
            if values.get(key, "").isdigit():
                image[key] = int(values[key])
        self.found.append(image)


def post_attachments(base: str, body_html: str) -> list[JsonObject]:
    """The post's own images as attachments, alt text as ``name`` (Mastodon shows them)."""
    reader = _MediaImages()
    reader.feed(body_html)
    reader.close()
    seen: set[str] = set()
    attachments = []
    for image in reader.found:
        if image["url"] not in seen:
            seen.add(image["url"])
            attachments.append({**image, "url": base + image["url"]})
    return attachments


def build_instance_actor(settings: Settings, public_key_pem: str) -> JsonObject:
    urls = Urls.of(settings)
    return {
        "@context": ACTOR_CONTEXT,
        "id": urls.instance_actor,
        "type": "Application",
        "preferredUsername": urlsplit(settings.base_url).hostname,
        "name": f"{settings.title} (server)",
        "url": urls.base + "/about",
        "inbox": urls.shared_inbox,
        "outbox": instance_outbox_id(settings),
        "manuallyApprovesFollowers": True,
        "discoverable": False,
        "indexable": False,
        "publicKey": {
            "id": urls.instance_key_id,
            "owner": urls.instance_actor,
            "publicKeyPem": public_key_pem,
        },
    }


def instance_outbox_id(settings: Settings) -> str:
    return Urls.of(settings).instance_actor + "/outbox"


def build_instance_outbox(settings: Settings) -> JsonObject:
    """The instance actor's outbox: it publishes nothing, but servers that read every
    advertised outbox (GoToSocial) warn about one that answers 404."""
    return {**build_collection(instance_outbox_id(settings), 0), "orderedItems": []}


def absolute_media(html: str, base: str) -> str:
    """Our images' URLs (src and srcset) are relative on the page; another server or a
    feed reader needs them absolute."""
    return html.replace('="/media/', f'="{base}/media/').replace(", /media/", f", {base}/media/")


def build_post_object(settings: Settings, post: Post) -> JsonObject:
    """A post as an Article (title, summary, link) or, by setting, a Note."""
    urls = Urls.of(settings)
    object_id = urls.object_id(post.uid)
    url = urls.post_url(post.slug)
    hashtags = [
        {"type": "Hashtag", "name": f"#{tag}", "href": urls.tag_url(tag)} for tag in post.tags
    ]
    tag_links = " ".join(
        f'<a href="{urls.tag_url(tag)}" class="mention hashtag" rel="tag">#<span>{tag}</span></a>'
        for tag in post.tags
    )
    document: JsonObject = {
        "@context": OBJECT_CONTEXT,
        "id": object_id,
        "type": settings.object_type,
        "attributedTo": urls.actor,
        "to": [PUBLIC],
        "cc": [urls.followers],
        "published": format_ts(post.published),
        "url": url,
        "mediaType": "text/html",
        "tag": hashtags,
        "replies": object_id + "/replies",
        "sensitive": False,
    }
    if settings.object_type == "Article":
        content = post.body_html + (f"<p>{tag_links}</p>" if tag_links else "")
        # Mastodon shows an Article as name + summary + link: the summary must stand alone.
        document["name"] = post.title
        document["summary"] = post.summary or None
    else:
        # A Note's summary is a content warning: never put an excerpt there.
        content = (
            f"<p><strong>{_escape(post.title)}</strong></p>{post.body_html}"
            f'<p><a href="{url}">{_escape(url)}</a></p>'
            + (f"<p>{tag_links}</p>" if tag_links else "")
        )
    content = absolute_media(content, urls.base)
    document["content"] = content
    document["contentMap"] = {settings.language: content}
    if post.updated:
        document["updated"] = format_ts(post.updated)
    attachments = post_attachments(urls.base, post.body_html)
    if post.image:
        image = post.image if "://" in post.image else urls.base + post.image
        cover: JsonObject = {"type": "Image", "url": image}
        if post.image_alt:
            cover["name"] = post.image_alt
        document["image"] = cover
        if not attachments:  # the cover stands in when the post shows no image of its own
            attachments = [{**cover, "name": post.image_alt or post.title}]
    if attachments:
        document["attachment"] = attachments
    return document


def build_create(settings: Settings, post: Post) -> JsonObject:
    note = build_post_object(settings, post)
    return _wrap("Create", f"{note['id']}/activity", settings, note, note["published"])


def build_update(settings: Settings, post: Post, updated: datetime) -> JsonObject:
    note = build_post_object(settings, post)
    stamp = format_ts(updated)
    activity_id = f"{note['id']}#updates/{int(updated.timestamp())}"
    return _wrap("Update", activity_id, settings, note, stamp)


def build_delete(settings: Settings, uid: str, deleted: datetime) -> JsonObject:
    urls = Urls.of(settings)
    object_id = urls.object_id(uid)
    tombstone = build_tombstone(object_id, deleted)
    del tombstone["@context"]
    return _wrap("Delete", f"{object_id}#delete", settings, tombstone, format_ts(deleted))


def build_featured(settings: Settings, pinned: list[Post]) -> JsonObject:
    """The pinned posts, as Mastodon serves its featured collection: the objects whole."""
    items = [
        {k: v for k, v in build_post_object(settings, post).items() if k != "@context"}
        for post in pinned
    ]
    return {
        "@context": OBJECT_CONTEXT,
        "id": Urls.of(settings).featured,
        "type": "OrderedCollection",
        "totalItems": len(items),
        "orderedItems": items,
    }


def build_pin(settings: Settings, uid: str, token: str, *, pinned: bool) -> JsonObject:
    """Add (pin) or Remove (unpin) a post's id to or from ``featured``, as Mastodon
    sends them; ``token`` makes each one's id new, so pin, unpin, pin all go out."""
    urls = Urls.of(settings)
    kind = "Add" if pinned else "Remove"
    return {
        "@context": OBJECT_CONTEXT,
        "id": f"{urls.actor}#{kind.lower()}s/{token}",
        "type": kind,
        "actor": urls.actor,
        "to": [PUBLIC],
        "cc": [urls.followers],
        "object": urls.object_id(uid),
        "target": urls.featured,
    }


def build_tombstone(object_id: str, deleted: datetime, former_type: str = "Article") -> JsonObject:
    return {
        "@context": AS_CONTEXT,
        "id": object_id,
        "type": "Tombstone",
        "formerType": former_type,
        "deleted": format_ts(deleted),
    }


def build_accept(settings: Settings, follow: JsonObject, *, reject: bool = False) -> JsonObject:
    """Accept (or Reject) a Follow, embedding it as the follower sent it."""
    urls = Urls.of(settings)
    follow_id = str(follow.get("id") or "")
    kind = "Reject" if reject else "Accept"
    return {
        "@context": AS_CONTEXT,
        "id": f"{urls.actor}#{kind.lower()}s/{_digest(follow_id)}",
        "type": kind,
        "actor": urls.actor,
        "to": [follow.get("actor")],
        "object": {
            "id": follow_id,
            "type": "Follow",
            "actor": follow.get("actor"),
            "object": urls.actor,
        },
    }


def build_collection(
    collection_id: str, total: int, *, ordered: bool = True, first: str | None = None
) -> JsonObject:
    document: JsonObject = {
        "@context": AS_CONTEXT,
        "id": collection_id,
        "type": "OrderedCollection" if ordered else "Collection",
        "totalItems": total,
    }
    if first is not None:
        document["first"] = first
    return document


def build_collection_page(
    collection_id: str, page: int, items: list[Any], *, has_next: bool
) -> JsonObject:
    document: JsonObject = {
        "@context": AS_CONTEXT,
        "id": f"{collection_id}?page={page}",
        "type": "OrderedCollectionPage",
        "partOf": collection_id,
        "orderedItems": items,
    }
    if has_next:
        document["next"] = f"{collection_id}?page={page + 1}"
    if page > 1:
        document["prev"] = f"{collection_id}?page={page - 1}"
    return document


def _wrap(
    kind: str, activity_id: str, settings: Settings, obj: JsonObject, when: str
) -> JsonObject:
    urls = Urls.of(settings)
    body = {key: value for key, value in obj.items() if key != "@context"}
    return {
        "@context": OBJECT_CONTEXT,
        "id": activity_id,
        "type": kind,
        "actor": urls.actor,
        "published": when,
        "to": [PUBLIC],
        "cc": [urls.followers],
        "object": body,
    }


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---- the author's answers to responses ---------------------------------------------------


def answer_audience(
    settings: Settings, visibility: Visibility, mentioned: str | None
) -> tuple[list[str], list[str]]:
    """(to, cc) of an answer, addressed like the response it answers, its author in cc."""
    urls = Urls.of(settings)
    also = [mentioned] if mentioned else []
    if visibility == "unlisted":
        return [urls.followers], [PUBLIC, *also]
    return [PUBLIC], [urls.followers, *also]


def mention_html(mentioned: Mentioned) -> str:
    """The link Mastodon writes for a mention (its client shows it as ``@user``); for an
    account without a username, the same link showing its id's host and path."""
    if not mentioned.username:
        return (
            f'<span class="h-card"><a href="{_escape(mentioned.profile_url)}"'
            f' class="u-url mention">{_escape(mentioned.handle)}</a></span>'
        )
    return (
        f'<span class="h-card"><a href="{_escape(mentioned.profile_url)}" class="u-url mention">'
        f"@<span>{_escape(mentioned.username)}</span></a></span>"
    )


def build_answer_note(settings: Settings, answer: AuthorAnswer) -> JsonObject:
    """The author's answer: a Note in reply to the response (or, for a response from the
    local form, which has no id, to the post), mentioning the response's author."""
    urls = Urls.of(settings)
    mentioned = answer.mentioned
    to, cc = answer_audience(settings, answer.visibility, mentioned.ap_id if mentioned else None)
    note: JsonObject = {
        "@context": OBJECT_CONTEXT,
        "id": answer.ap_id,
        "type": "Note",
        "attributedTo": urls.actor,
        "inReplyTo": answer.parent_ap_id or urls.object_id(answer.post_uid),
        "to": to,
        "cc": cc,
        "published": format_ts(answer.published),
        "url": urls.response_url(answer.post_slug, answer.id),
        "mediaType": "text/html",
        "content": answer.content_html,
        "contentMap": {settings.language: answer.content_html},
        "tag": (
            [{"type": "Mention", "href": mentioned.ap_id, "name": mentioned.handle}]
            if mentioned
            else []
        ),
        "sensitive": False,
    }
    if answer.updated:
        note["updated"] = format_ts(answer.updated)
    return note


def build_answer_create(settings: Settings, answer: AuthorAnswer) -> JsonObject:
    note = build_answer_note(settings, answer)
    return _wrap_answer("Create", f"{answer.ap_id}#create", settings, note, note["published"])


def build_answer_update(settings: Settings, answer: AuthorAnswer) -> JsonObject:
    """The answer as edited (``answer.updated`` set): its id says when, so each edit is new."""
    assert answer.updated is not None
    note = build_answer_note(settings, answer)
    activity_id = f"{answer.ap_id}#updates/{int(answer.updated.timestamp())}"
    return _wrap_answer("Update", activity_id, settings, note, note["updated"])


def build_answer_delete(settings: Settings, answer: AuthorAnswer, deleted: datetime) -> JsonObject:
    tombstone = build_tombstone(answer.ap_id, deleted, "Note")
    del tombstone["@context"]
    note = build_answer_note(settings, answer)  # for its audience
    activity = _wrap_answer("Delete", f"{answer.ap_id}#delete", settings, note, format_ts(deleted))
    activity["object"] = tombstone
    return activity


def _wrap_answer(
    kind: str, activity_id: str, settings: Settings, note: JsonObject, when: str
) -> JsonObject:
    # Addressed like the Note: the mentioned person is in cc, so their server takes it.
    activity = _wrap(kind, activity_id, settings, note, when)
    activity["to"], activity["cc"] = note["to"], note["cc"]
    return activity


# ---- reading what others send ---------------------------------------------------------


def as_list(value: Any) -> list[Any]:
    """``to``, ``cc``, ``tag``… may be one value or a list (GoToSocial sends both)."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def id_of(value: Any) -> str | None:
    """The id of an embedded object or a bare IRI; None if there is neither."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        found = value.get("id")
        return found if isinstance(found, str) else None
    return None


@lru_cache(maxsize=8192)  # actor and key ids repeat: the inbox asks several times per POST
def host_of(url: str) -> str:
    """The authority (host[:port]) of an http(s) URL, lower case, IDN in punycode; ''
    if it is not one. One form for every comparison: a block of ``xn--…`` also
    catches ids written in Unicode."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return ""
    authority = parts.netloc.rsplit("@", 1)[-1].lower()
    host, colon, port = authority.rpartition(":") if not authority.endswith("]") else ("", "", "")
    if not colon or not port.isdigit():
        host, colon, port = authority, "", ""
    return ascii_host(host) + colon + port


def require_http_url(value: Any, what: str, *, allow_http: bool) -> str:
    """An http(s) URL (https only unless allowed), or ActivityError (ATTACKS.md 23)."""
    if not isinstance(value, str) or len(value) > 2048:
        raise ActivityError(f"{what} must be a URL")
    if " " in value or not value.isprintable() or strip_invisible(value) != value:
        # A URL never holds these raw; in a page they would hide or reorder (ATTACKS.md 34).
        raise ActivityError(f"{what} has spaces, control or invisible characters in it")
    try:
        scheme = urlsplit(value).scheme
        host = host_of(value)
    except ValueError:  # urlsplit refuses some, e.g. an unclosed IPv6 host "https://[::1/x"
        raise ActivityError(f"{what} is not a valid URL") from None
    if scheme != "https" and not (allow_http and scheme == "http"):
        raise ActivityError(f"{what} must be an https URL")
    if not host:
        raise ActivityError(f"{what} has no host")
    return value


def plain_text(value: Any, limit: int) -> str:
    """A display string from untrusted input: no control, bidi or zero-width characters,
    whitespace folded, at most ``limit`` characters (ATTACKS.md 34)."""
    if not isinstance(value, str):
        return ""
    return " ".join(strip_invisible(value).split())[:limit]


def is_public(activity_or_object: JsonObject) -> bool:
    audience = as_list(activity_or_object.get("to")) + as_list(activity_or_object.get("cc"))
    return any(isinstance(item, str) and item in PUBLIC_ALIASES for item in audience)


@dataclass(frozen=True, slots=True)
class RemoteActor:
    """The parts of a remote actor document we keep."""

    ap_id: str
    type: str
    username: str
    domain: str
    name: str
    url: str | None
    icon_url: str | None
    inbox: str
    shared_inbox: str | None
    key_id: str
    public_key_pem: str


# A tuple, not a set: a JSON ``type`` may be a list, and ``[...] in a_set`` raises TypeError.
ACTOR_TYPES = ("Person", "Service", "Application", "Group", "Organization")


def parse_actor(document: JsonObject, *, allow_http: bool) -> RemoteActor:
    """Validate a fetched actor document; raise ActivityError if it is unusable."""
    ap_id = require_http_url(document.get("id"), "actor id", allow_http=allow_http)
    kind = document.get("type")
    if kind not in ACTOR_TYPES:
        raise ActivityError(f"{kind!r} is not an actor type")
    # Optional: fediverse-pasture's actors that WebFinger cannot resolve have none, and
    # FEP-03c1 names such an actor by its id. They get no handle ("" here), not one we
    # would make up from the host.
    username = document.get("preferredUsername")
    if username is None or username == "":
        username = ""
    elif not isinstance(username, str) or len(username) > 256:
        raise ActivityError("the actor's preferredUsername is not a short string")
    elif "@" in username or any(c.isspace() for c in username):
        # "@admin@blog.example" + "@evil.example" would show another host first (ATTACKS 34).
        raise ActivityError("the actor's preferredUsername has '@' or spaces in it")
    key = document.get("publicKey")
    if isinstance(key, list):  # some servers publish several keys; take the first RSA one
        key = next((k for k in key if isinstance(k, dict)), None)
    if not isinstance(key, dict):
        raise ActivityError("the actor has no publicKey")
    key_id = require_http_url(key.get("id"), "publicKey.id", allow_http=allow_http)
    pem = key.get("publicKeyPem")
    if not isinstance(pem, str) or "PUBLIC KEY" not in pem or len(pem) > 16_384:
        raise ActivityError("the actor's publicKeyPem is missing")
    if key.get("owner", ap_id) != ap_id or host_of(key_id) != host_of(ap_id):
        raise ActivityError("the actor's key belongs to someone else")
    inbox = require_http_url(document.get("inbox"), "inbox", allow_http=allow_http)
    endpoints = document.get("endpoints")
    shared = endpoints.get("sharedInbox") if isinstance(endpoints, dict) else None
    shared = shared or document.get("sharedInbox")  # Misskey puts it at the top level
    shared_inbox = _optional_url(shared, allow_http)
    icon = document.get("icon")
    if isinstance(icon, list):
        icon = icon[0] if icon else None
    icon_url = _optional_url(icon.get("url") if isinstance(icon, dict) else icon, allow_http)
    url = document.get("url")
    if isinstance(url, dict):
        url = url.get("href")
    return RemoteActor(
        ap_id=ap_id,
        type=str(kind),
        username=plain_text(username, 64),
        domain=host_of(ap_id),  # punycode: a handle cannot be a homoglyph (ATTACKS.md 34)
        name=plain_text(document.get("name"), 100),
        url=_optional_url(url, allow_http),
        icon_url=icon_url,
        inbox=inbox,
        shared_inbox=shared_inbox,
        key_id=key_id,
        public_key_pem=pem,
    )


def parse_key_document(document: JsonObject) -> tuple[str, str | None]:
    """A stand-alone key document ``{id, owner, publicKeyPem}``, or GoToSocial's stub at
    ``…/main-key`` (the owner's id and a ``publicKey``, no inbox): (owner, pem or None)."""
    key = document.get("publicKey")
    if "owner" not in document and isinstance(key, dict):
        document = key  # GoToSocial's stub
    owner = document.get("owner")
    if not isinstance(owner, str):
        raise ActivityError("the key document names no owner")
    pem = document.get("publicKeyPem")
    return owner, pem if isinstance(pem, str) else None


def _optional_url(value: Any, allow_http: bool) -> str | None:
    try:
        return require_http_url(value, "url", allow_http=allow_http)
    except ActivityError:
        return None


def strip_fragment(url: str) -> str:
    return url.split("#", 1)[0]


def is_unicode(text: str) -> bool:
    """Whether every database can store it as text: JSON may escape half a surrogate
    pair ("\\ud800"), or a NUL ("\\u0000"), which PostgreSQL's text cannot hold."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
