"""Settings from the environment and fediblog.toml, and their one-line errors."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from fediblog.config import Location, NoBaseUrl, find_blog, load_settings, write_config
from fediblog.errors import ConfigError


def env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"FEDIBLOG_CONFIG": str(tmp_path / "fediblog.toml"), **values}


def test_no_base_url_says_it_is_not_set_and_how_to_set_it(tmp_path: Path) -> None:
    with pytest.raises(NoBaseUrl) as caught:
        load_settings(env(tmp_path))
    message = str(caught.value)
    assert "is http" not in message  # nobody chose http: nobody chose anything
    assert f"the blog's address is not set ({tmp_path / 'fediblog.toml'} does not exist" in message
    assert "`fediblog init --base-url https://YOUR.DOMAIN`" in message
    assert "FEDIBLOG_ALLOW_HTTP=1" in message
    assert "\n" not in message

    (tmp_path / "fediblog.toml").write_text('title = "Mine"\n')
    with pytest.raises(NoBaseUrl, match=re.escape("fediblog.toml has no base_url")):
        load_settings(env(tmp_path))


def test_the_local_default_needs_the_explicit_switch(tmp_path: Path) -> None:
    local = load_settings(env(tmp_path, FEDIBLOG_ALLOW_HTTP="1"))
    assert local.base_url == "http://127.0.0.1:8000"
    assert local.acct == "blog@127.0.0.1:8000"  # the port is part of the host
    assert local.handle == "blog"
    # The default paths are in the blog's folder: FEDIBLOG_CONFIG's.
    assert local.database == tmp_path / "data" / "fediblog.db"
    assert local.keys_dir == tmp_path / "keys"
    assert local.media_dir == tmp_path / "data" / "media"


def test_an_http_base_url_someone_set_is_refused_as_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FEDIBLOG_BASE_URL is http: the fediverse needs https"):
        load_settings(env(tmp_path, FEDIBLOG_BASE_URL="http://blog.example"))


def test_without_data_or_config_the_blog_is_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fediblog.toml").write_text('base_url = "https://here.example"\n')
    settings = load_settings({})
    assert settings.base_url == "https://here.example"
    assert settings.database == Path("data/fediblog.db")  # as short as the user would type
    assert settings.keys_dir == Path("keys")
    assert find_blog(None, {}) == Location(Path("."), Path("fediblog.toml"))


def test_data_folder_holds_the_toml_and_its_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blog = tmp_path / "blog"
    blog.mkdir()
    (blog / "fediblog.toml").write_text(
        'base_url = "https://data.example"\ndatabase = "db/blog.db"\n'
        f'keys_dir = "{tmp_path / "elsewhere"}"\n'
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where we run from does not matter

    settings = load_settings({}, data=blog)

    assert settings.base_url == "https://data.example"
    assert settings.database == blog / "db" / "blog.db"  # relative to the toml's folder
    assert settings.keys_dir == tmp_path / "elsewhere"  # absolute: as written
    assert settings.media_dir == blog / "data" / "media"  # a default: in the blog's folder
    # --data wins over FEDIBLOG_CONFIG; the environment's paths are the shell's (cwd).
    other = env(tmp_path, FEDIBLOG_DATABASE="mine.db")
    assert load_settings(other, data=blog).database == Path("mine.db")
    assert load_settings(other, data=blog).base_url == "https://data.example"


def test_config_file_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "fediblog.toml").write_text('base_url = "https://c.example"\nmedia_dir = "m"\n')
    settings = load_settings({"FEDIBLOG_CONFIG": str(folder / "fediblog.toml")})
    assert settings.media_dir == folder / "m"
    assert settings.database == folder / "data" / "fediblog.db"


def test_avatar_and_header_files_are_relative_to_the_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blog = tmp_path / "blog"
    blog.mkdir()
    (blog / "fediblog.toml").write_text(
        'base_url = "https://a.example"\navatar = "me.png"\n'
        f'header = "{tmp_path / "art" / "header.png"}"\n'
    )
    monkeypatch.chdir(tmp_path)  # `fediblog --data blog serve` from another folder

    settings = load_settings({}, data=blog)

    assert settings.avatar == str(blog / "me.png")
    assert settings.header == str(tmp_path / "art" / "header.png")  # absolute: as written
    # From the environment, a path is the shell's, as for the database.
    mine = load_settings({"FEDIBLOG_AVATAR": "mine.png"}, data=blog)
    assert mine.avatar == "mine.png"
    (tmp_path / "fediblog.toml").write_text('base_url = "https://b.example"\navatar = ""\n')
    assert load_settings({}, data=tmp_path).avatar == ""  # none set: none


def test_write_config_writes_a_private_file_that_reads_back(tmp_path: Path) -> None:
    config = tmp_path / "new" / "fediblog.toml"
    tricky = 'A "quoted" \\ title\twith\x7fcontrol \u2603'
    values = {"base_url": "https://w.example", "handle": "blog", "title": tricky}

    assert write_config(config, values) is True

    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    settings = load_settings({}, data=config.parent)
    assert (settings.base_url, settings.handle, settings.title) == (
        "https://w.example",
        "blog",
        tricky,
    )
    assert "do not change them" in config.read_text()


def test_write_config_keeps_the_same_file_and_refuses_a_different_one(tmp_path: Path) -> None:
    config = tmp_path / "fediblog.toml"
    write_config(config, {"base_url": "https://w.example", "handle": "blog"})
    before = config.read_bytes()

    assert write_config(config, {"base_url": "https://W.example/"}) is False  # the same URL
    with pytest.raises(ConfigError, match=re.escape("says base_url = 'https://w.example', not")):
        write_config(config, {"base_url": "https://other.example"})
    with pytest.raises(ConfigError, match="has no title"):
        write_config(config, {"title": "New"})
    assert config.read_bytes() == before


def test_environment_sets_everything(tmp_path: Path) -> None:
    settings = load_settings(
        env(
            tmp_path,
            FEDIBLOG_BASE_URL="https://Example.COM/",
            FEDIBLOG_HANDLE="notes",
            FEDIBLOG_TITLE="Notes",
            FEDIBLOG_DESCRIPTION="Things",
            FEDIBLOG_AUTHOR="Ann",
            FEDIBLOG_DATABASE=str(tmp_path / "x.db"),
            FEDIBLOG_KEYS_DIR=str(tmp_path / "k"),
        )
    )
    assert settings.base_url == "https://example.com"
    assert settings.acct == "notes@example.com"
    assert (settings.title, settings.description, settings.author) == ("Notes", "Things", "Ann")
    assert settings.database == tmp_path / "x.db"
    assert settings.url("/about") == "https://example.com/about"


def test_toml_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / "fediblog.toml").write_text(
        'base_url = "https://toml.example"\ntitle = "From TOML"\nposts_per_page = 5\n'
    )
    settings = load_settings(env(tmp_path, FEDIBLOG_TITLE="From env"))
    assert settings.base_url == "https://toml.example"
    assert settings.title == "From env"
    assert settings.posts_per_page == 5


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"FEDIBLOG_BASE_URL": "ftp://x.example"}, "absolute https URL"),
        ({"FEDIBLOG_BASE_URL": "https://x.example/blog"}, "scheme and host only"),
        ({"FEDIBLOG_BASE_URL": "example.com"}, "absolute https URL"),
        ({"FEDIBLOG_HANDLE": "a b"}, "FEDIBLOG_HANDLE"),
        ({"FEDIBLOG_ALLOW_HTTP": "maybe"}, "true or false"),
        ({"FEDIBLOG_POSTS_PER_PAGE": "lots"}, "whole number"),
        ({"FEDIBLOG_OBJECT_TYPE": "Page"}, "Article, Note"),
        ({"FEDIBLOG_MODERATION": "sometimes"}, "open, first, all"),
    ],
)
def test_wrong_settings_are_one_clear_line(
    tmp_path: Path, values: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(env(tmp_path, **{"FEDIBLOG_BASE_URL": "https://ok.example", **values}))
    assert "\n" not in str(caught.value)


def test_broken_or_unknown_toml_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "fediblog.toml").write_text("title = \n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env(tmp_path))
    (tmp_path / "fediblog.toml").write_text('titel = "typo"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env(tmp_path))


@pytest.mark.parametrize("where", ["env", "toml"])
def test_a_postgresql_url_names_a_server_not_a_file(tmp_path: Path, where: str) -> None:
    url = "postgresql://blog:s3cret@db.internal:5432/blog"
    values = {"FEDIBLOG_ALLOW_HTTP": "1"}
    if where == "env":
        values["FEDIBLOG_DATABASE"] = url
    else:
        (tmp_path / "fediblog.toml").write_text(f'database = "{url}"\n')
    settings = load_settings(env(tmp_path, **values))
    assert settings.database_url == url
    assert settings.store_location == url
    # The file default stays in the blog's folder (the media proxy's cache sits beside it).
    assert settings.database == tmp_path / "data" / "fediblog.db"
    # The password is in no message and no repr.
    assert settings.database_location_shown == "postgresql://blog:***@db.internal:5432/blog"
    assert "s3cret" not in repr(settings)


def test_a_path_keeps_sqlite_and_database_url_is_no_setting_of_its_own(tmp_path: Path) -> None:
    settings = load_settings(env(tmp_path, FEDIBLOG_ALLOW_HTTP="1", FEDIBLOG_DATABASE="x.db"))
    assert settings.database_url == ""
    assert settings.store_location == Path("x.db")
    (tmp_path / "fediblog.toml").write_text('database_url = "postgresql://h/db"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(env(tmp_path, FEDIBLOG_ALLOW_HTTP="1"))
