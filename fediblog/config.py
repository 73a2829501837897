"""Settings: one frozen object built from ``FEDIBLOG_*`` variables and fediblog.toml,
and where the blog lives.

Nothing here runs at import time. ``find_blog()`` names the blog's folder and its
fediblog.toml: the folder given with ``--data DIR``, else the folder of the file
``FEDIBLOG_CONFIG`` names, else the current folder. ``load_settings()`` reads that
optional TOML file, then lets the environment override it, validates everything and
raises ``ConfigError`` with one readable line on the first problem. Relative paths in
the TOML file, and the default paths, are relative to the blog's folder; relative paths
in the environment are relative to the current folder, as a shell user expects.
``write_config()`` writes the fediblog.toml `fediblog init` makes.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from dataclasses import field as setting
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fediblog.errors import ConfigError

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
MODERATION_MODES = ("open", "first", "all")
OBJECT_TYPES = ("Article", "Note")
ACTOR_TYPES = ("Person", "Service")
# Whole-number settings that need another range than the usual 1..100.
INT_RANGES: dict[str, tuple[int, int]] = {
    "retention_days": (1, 3650),
    "header_timeout": (1, 300),
    "body_timeout": (1, 3600),
    "keep_alive_timeout": (1, 300),
    "shutdown_timeout": (1, 600),
    "responses_per_page": (1, 10_000),
    "proxy_cache_mb": (1, 1_000_000),
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server and the CLI need to know, validated."""

    base_url: str = DEFAULT_BASE_URL
    handle: str = "blog"
    title: str = "fediblog"
    description: str = "A blog that lives in the fediverse."
    author: str = "The author"
    database: Path = Path("data/fediblog.db")
    # FEDIBLOG_DATABASE=postgresql://user:password@host/name: the blog's data on a
    # PostgreSQL server instead of the SQLite file above (store/postgres.py); "" for SQLite.
    database_url: str = setting(default="", repr=False)  # may hold a password
    keys_dir: Path = Path("keys")
    allow_http: bool = False
    allow_private_addresses: bool = False
    language: str = "en"
    posts_per_page: int = 10
    object_type: str = "Article"
    actor_type: str = "Person"
    manually_approves_followers: bool = False
    hide_followers: bool = False
    moderation: str = "open"
    hold_keywords: str = ""  # comma-separated; a reply containing one waits for approval
    retention_days: int = 30  # processed inbox rows and finished deliveries live this long
    # Client timeouts, in seconds (server.py): a request head must arrive within
    # header_timeout, its body within body_timeout; an idle keep-alive connection is
    # closed after keep_alive_timeout; on stop, requests get shutdown_timeout to finish.
    header_timeout: int = 10
    body_timeout: int = 30
    keep_alive_timeout: int = 5
    shutdown_timeout: int = 10
    # Responses are paged by top-level thread, each thread whole (web/html.py).
    responses_per_page: int = 100
    # The webhook (notify.py): one signed JSON POST per new or held response. The
    # secret signs each body (HMAC-SHA256); the topic is for ntfy's JSON API.
    notify_url: str = ""
    notify_secret: str = setting(default="", repr=False)  # never in a log or a traceback
    notify_topic: str = ""
    # The media proxy (proxy.py): commenters' images, kept beside the database in
    # proxy/, at most this many megabytes (least recently used first out).
    proxy_cache_mb: int = 500
    # The media store (media.py): images of posts, resized and stripped of EXIF. The
    # avatar and header are local image files, imported into it when the server starts.
    media_dir: Path = Path("data/media")
    avatar: str = ""
    header: str = ""
    # What operators see (web/health.py): one log line per request when access_log is
    # on; /metrics for loopback clients, or for anyone sending this bearer token.
    access_log: bool = False
    metrics_token: str = setting(default="", repr=False)

    # ---- derived values -------------------------------------------------------

    @property
    def store_location(self) -> Path | str:
        """What ``Store.open`` takes: the PostgreSQL URL, or the SQLite file."""
        return self.database_url or self.database

    @property
    def database_location_shown(self) -> str:
        """Where the data is, for messages: the file, or the URL without its password."""
        return without_password(self.database_url) if self.database_url else str(self.database)

    @property
    def host(self) -> str:
        """The public host, with its port when it is not the scheme's default."""
        return urlsplit(self.base_url).netloc

    @property
    def scheme(self) -> str:
        return urlsplit(self.base_url).scheme

    @property
    def keywords(self) -> tuple[str, ...]:
        return tuple(k.strip().lower() for k in self.hold_keywords.split(",") if k.strip())

    @property
    def acct(self) -> str:
        """``handle@host``, the blog's fediverse address without the leading @."""
        return f"{self.handle}@{self.host}"

    def url(self, path: str) -> str:
        """An absolute URL on this blog for a path that starts with ``/``."""
        return self.base_url + path


def without_password(url: str) -> str:
    """A URL as messages show it: its password, if any, as ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def is_database_url(value: object) -> bool:
    """Whether a FEDIBLOG_DATABASE value names a PostgreSQL server, not a file."""
    return isinstance(value, str) and value.strip().startswith(("postgresql://", "postgres://"))


_BOOL_TRUE = {"1", "true", "yes", "on"}
_BOOL_FALSE = {"0", "false", "no", "off", ""}


def _to_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _BOOL_TRUE:
        return True
    if text in _BOOL_FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _to_int(name: str, value: object, low: int, high: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, not {number}")
    return number


def _env_name(field_name: str) -> str:
    return "FEDIBLOG_" + field_name.upper()


CONFIG_NAME = "fediblog.toml"


@dataclass(frozen=True, slots=True)
class Location:
    """Where a blog lives: its folder, which holds ``data/`` (the database, the media)
    and ``keys/`` unless its settings say otherwise, and its fediblog.toml (which may
    not exist)."""

    folder: Path
    config: Path


def find_blog(data: Path | None = None, environ: Mapping[str, str] | None = None) -> Location:
    """``--data DIR``, else the folder of ``FEDIBLOG_CONFIG``'s file, else the current one."""
    env = os.environ if environ is None else environ
    if data is not None:
        folder = _short(data.expanduser())
        return Location(folder, folder / CONFIG_NAME)
    if named := env.get("FEDIBLOG_CONFIG", ""):
        config = Path(named).expanduser()
        return Location(_short(config.parent), _short(config.parent) / config.name)
    return Location(Path("."), Path(CONFIG_NAME))


def _short(folder: Path) -> Path:
    """``.`` for the current folder: paths in messages stay as short as a user types them
    there (``chmod 600 keys/blog.pem``)."""
    try:
        return Path(".") if folder.resolve() == Path.cwd().resolve() else folder
    except OSError:  # the current folder was removed under us
        return folder


class NoBaseUrl(ConfigError):
    """No base URL is set anywhere, and the local default is not allowed."""


_DEFAULT_PATHS = {f.name: f.default for f in fields(Settings) if isinstance(f.default, Path)}
_IMAGE_FILES = ("avatar", "header")  # local image files, named by path in the settings
_CONFIG_HEADER = """\
# fediblog's settings; README.md ("Configuration") lists them all. Relative paths are
# relative to this file's folder. base_url and handle are in every id the fediverse
# keeps of this blog: do not change them once the blog has followers.
"""


def write_config(config: Path, values: Mapping[str, str]) -> bool:
    """Write a new fediblog.toml holding ``values`` (mode 0600: it may come to hold the
    webhook's secret). False if the file is there and already says the same; a
    ConfigError, and nothing written, if it says something else."""
    folder = config.parent
    existing = _read_toml(config, folder) if config.exists() else None
    if existing is not None:
        for key, value in values.items():
            had = existing.get(key)
            same = had is not None and _same(key, str(had), value)
            if not same:
                says = f"says {key} = {had!r}" if had is not None else f"has no {key}"
                raise ConfigError(
                    f"{config} already exists and {says}, not {value!r}: it is kept as it"
                    " is (edit it by hand, or choose another folder with --data DIR)"
                )
        return False
    lines = [f"{key} = {_toml_string(value)}" for key, value in values.items()]
    text = _CONFIG_HEADER + "\n".join(lines) + "\n"
    if tomllib.loads(text) != dict(values):  # never write a file we would misread
        raise ConfigError(f"cannot write these settings to {config}")
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        raise ConfigError(f"cannot write {config}: {error.strerror or error}") from None
    return True


def _same(key: str, had: str, wanted: str) -> bool:
    if key == "base_url":  # as _validate normalizes it
        return had.strip().rstrip("/").lower() == wanted.strip().rstrip("/").lower()
    return had.strip() == wanted.strip()


def _toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML wants DEL escaped."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _read_toml(path: Path, folder: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"cannot read {path}: {error}") from None
    unknown = set(data) - {f.name for f in fields(Settings)} | {"database_url"} & set(data)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    for name in _DEFAULT_PATHS:
        if isinstance(data.get(name), str) and not is_database_url(data[name]):
            # Relative to the file, wherever we run from.
            data[name] = folder / Path(data[name]).expanduser()
    for name in _IMAGE_FILES:  # files too, though kept as text ("" means none)
        if isinstance(data.get(name), str) and data[name].strip():
            data[name] = str(folder / Path(data[name].strip()).expanduser())
    return data


def load_settings(
    environ: Mapping[str, str] | None = None, *, data: Path | None = None, **overrides: Any
) -> Settings:
    """Build validated settings: defaults < fediblog.toml < environment < overrides.
    ``data`` is the ``--data`` folder (see ``find_blog``)."""
    env = os.environ if environ is None else environ
    where = find_blog(data, env)
    raw: dict[str, Any] = _read_toml(where.config, where.folder)
    for field in fields(Settings):
        name = _env_name(field.name)
        if name in env:
            raw[field.name] = env[name]
    raw.update({key: value for key, value in overrides.items() if value is not None})
    # Set through FEDIBLOG_DATABASE (or database in fediblog.toml) only, never by name.
    raw.pop("database_url", None)
    if is_database_url(raw.get("database")):
        raw["database_url"] = str(raw.pop("database")).strip()
    if "base_url" not in raw and not _to_bool("FEDIBLOG_ALLOW_HTTP", raw.get("allow_http", False)):
        # Not "is http": nobody chose http, nobody chose anything yet.
        found = "has no base_url" if where.config.is_file() else "does not exist"
        raise NoBaseUrl(
            f"the blog's address is not set ({where.config} {found} and FEDIBLOG_BASE_URL"
            " is not set): run `fediblog init --base-url https://YOUR.DOMAIN`, which writes"
            " it to fediblog.toml (for a local try, FEDIBLOG_ALLOW_HTTP=1 uses"
            f" {DEFAULT_BASE_URL})"
        )
    for name, default in _DEFAULT_PATHS.items():
        raw.setdefault(name, where.folder / default)
    return _validate(raw)


def _validate(raw: Mapping[str, Any]) -> Settings:
    settings = Settings()
    values: dict[str, Any] = {}
    for field in fields(Settings):
        if field.name not in raw:
            continue
        value = raw[field.name]
        name = _env_name(field.name)
        default = getattr(settings, field.name)
        if isinstance(default, bool):
            values[field.name] = _to_bool(name, value)
        elif isinstance(default, int):
            low, high = INT_RANGES.get(field.name, (1, 100))
            values[field.name] = _to_int(name, value, low, high)
        elif isinstance(default, Path):
            values[field.name] = Path(str(value)).expanduser()
        else:
            values[field.name] = str(value).strip()
    settings = replace(settings, **values)

    base = settings.base_url.rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"FEDIBLOG_BASE_URL must be an absolute https URL, not {settings.base_url!r}"
        )
    if parts.scheme == "http" and not settings.allow_http:
        raise ConfigError(
            "FEDIBLOG_BASE_URL is http: the fediverse needs https "
            "(set FEDIBLOG_ALLOW_HTTP=1 for local use only)"
        )
    if parts.path or parts.query or parts.fragment or parts.username:
        raise ConfigError(
            "FEDIBLOG_BASE_URL must be scheme and host only (no path, query or user), "
            f"not {settings.base_url!r}"
        )
    handle = settings.handle
    if not handle or not all(c.isascii() and (c.isalnum() or c in "_-.") for c in handle):
        raise ConfigError(
            f"FEDIBLOG_HANDLE may use only letters, digits, '_', '-' and '.', not {handle!r}"
        )
    if settings.object_type not in OBJECT_TYPES:
        raise ConfigError(f"FEDIBLOG_OBJECT_TYPE must be one of {', '.join(OBJECT_TYPES)}")
    if settings.actor_type not in ACTOR_TYPES:
        raise ConfigError(f"FEDIBLOG_ACTOR_TYPE must be one of {', '.join(ACTOR_TYPES)}")
    if settings.moderation not in MODERATION_MODES:
        raise ConfigError(f"FEDIBLOG_MODERATION must be one of {', '.join(MODERATION_MODES)}")
    if not settings.title:
        raise ConfigError("FEDIBLOG_TITLE must not be empty")
    _check_notify(settings)
    if settings.metrics_token and len(settings.metrics_token) < MIN_NOTIFY_SECRET:
        raise ConfigError(
            f"FEDIBLOG_METRICS_TOKEN must be at least {MIN_NOTIFY_SECRET} characters long"
        )
    return replace(settings, base_url=base.lower() if base.isascii() else base)


MIN_NOTIFY_SECRET = 16


def _check_notify(settings: Settings) -> None:
    """The webhook settings: a URL we may POST to, and a secret to sign with. The
    messages never repeat the URL or the secret, which may carry credentials."""
    if not settings.notify_url:
        if settings.notify_topic:
            raise ConfigError("FEDIBLOG_NOTIFY_TOPIC is set but FEDIBLOG_NOTIFY_URL is not")
        return
    try:
        parts = urlsplit(settings.notify_url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError("FEDIBLOG_NOTIFY_URL is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("FEDIBLOG_NOTIFY_URL must be an absolute https URL")
    if parts.scheme == "http" and not settings.allow_http:
        raise ConfigError(
            "FEDIBLOG_NOTIFY_URL is http: use https (or set FEDIBLOG_ALLOW_HTTP=1 for local use)"
        )
    if parts.fragment or any(c.isspace() for c in settings.notify_url):
        raise ConfigError("FEDIBLOG_NOTIFY_URL must have no spaces and no #fragment")
    if not settings.notify_secret:
        raise ConfigError(
            "FEDIBLOG_NOTIFY_URL is set, so FEDIBLOG_NOTIFY_SECRET must be too: the secret"
            " that signs each notification (e.g. `openssl rand -hex 32`)"
        )
    if len(settings.notify_secret) < MIN_NOTIFY_SECRET:
        raise ConfigError(
            f"FEDIBLOG_NOTIFY_SECRET must be at least {MIN_NOTIFY_SECRET} characters long"
        )
    topic = settings.notify_topic
    if topic and not (
        len(topic) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in topic)
    ):
        raise ConfigError(
            "FEDIBLOG_NOTIFY_TOPIC may use only letters, digits, '_' and '-' (64 at most)"
        )
