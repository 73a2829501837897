"""What a route handler may use, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from starlette.requests import Request

from fediblog.blog import Blog
from fediblog.config import Settings
from fediblog.store import Store
from fediblog.web.cache import PageCache


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    store: Store
    blog: Blog
    templates: jinja2.Environment
    pages: PageCache


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
