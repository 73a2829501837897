"""Settings from the environment and fediblog.toml, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fediblog.config import load_settings
from fediblog.errors import ConfigError


def env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"FEDIBLOG_CONFIG": str(tmp_path / "fediblog.toml"), **values}


def test_defaults_need_https_or_an_explicit_local_switch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FEDIBLOG_ALLOW_HTTP"):
        load_settings(env(tmp_path))
    local = load_settings(env(tmp_path, FEDIBLOG_ALLOW_HTTP="1"))
    assert local.base_url == "http://127.0.0.1:8000"
    assert local.acct == "blog@127.0.0.1:8000"  # the port is part of the host
    assert local.handle == "blog"
    assert local.database == Path("data/fediblog.db")
    assert local.keys_dir == Path("keys")


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
