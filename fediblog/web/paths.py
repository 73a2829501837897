"""Path parameters the routes share: a row's number in a URL.

``{name:int}`` matches any run of digits, and a number above 2**63 - 1 then reaches
SQLite as an OverflowError (a 500). ``row_id`` matches 1 to 18 digits, every number a
row can have in practice (SQLite's own limit is 19 digits), so a longer one matches no
route and is a 404 like any other unknown address.
"""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor


class _RowId(Convertor[int]):
    regex = "[0-9]{1,18}"

    def convert(self, value: str) -> int:
        return int(value)

    def to_string(self, value: int) -> str:
        return str(value)


register_url_convertor("rowid", _RowId())


def row_id(name: str) -> str:
    """The path segment for the row number ``name``: ``{name:rowid}``."""
    return "{" + name + ":rowid}"
