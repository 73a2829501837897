"""What a route handler may use, built once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import jinja2
from starlette.requests import Request

from fediblog.activitystreams import Urls
from fediblog.blog import Blog
from fediblog.config import Settings
from fediblog.crawl import Crawler
from fediblog.delivery import Deliverer
from fediblog.desk import Desk
from fediblog.inbox import Inbox
from fediblog.notify import Notifier
from fediblog.proxy import MediaProxy
from fediblog.remote import Fetcher
from fediblog.store import Store
from fediblog.web.cache import PageCache
from fediblog.web.ratelimit import RateLimit


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    store: Store
    blog: Blog
    templates: jinja2.Environment
    pages: PageCache
    urls: Urls
    inbox: Inbox
    deliverer: Deliverer
    blog_public_pem: str
    instance_public_pem: str
    created_at: datetime
    fetcher: Fetcher
    interact_limit: RateLimit
    comment_limit: RateLimit
    crawler: Crawler
    notifier: Notifier
    proxy: MediaProxy
    desk: Desk  # the author's account and sessions (web/admin)


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found
