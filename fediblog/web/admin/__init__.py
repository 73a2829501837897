"""The author's desk: the web admin at /admin. Routes only; the work is done by the
services (desk.py for the account and sessions; blog, moderation, followers… for the
rest), the same ones the CLI calls.

Every request under /admin goes through ``guard.Guard`` (installed on the whole app in
app.py, matching by path): a session is required (GET and HEAD without one go to the
sign-in page, anything else gets a 403), every unsafe method needs the session's CSRF
token, and every response gets ``Cache-Control: no-store`` and the admin CSP. A route
cannot opt out, and tests/test_admin_security.py walks every route under /admin in the
app's route table with every method, so a new route is tested without being listed.

To add a section (say Subscriptions), copy dashboard.py:

1. ``fediblog/web/admin/subscriptions.py``: handlers that read with ``ctx.store.get_*`` /
   ``list_*`` and change things only through a service (never ``store.save_*``; a test
   checks), and end with ``return render(request, "admin/subscriptions.html", title=…,
   **context)`` (page.py). A POST handler reads ``await read_form(request)`` (the guard
   has checked its CSRF token already) and answers with a 303 redirect to a GET page.
   ``signed_in(request)`` is the session, if a handler needs it. Module-level
   ``routes = [Route("/admin/subscriptions", page), Route("/admin/subscriptions/end",
   end, methods=["POST"])]``: full paths, under /admin.
2. ``fediblog/templates/admin/subscriptions.html``: ``{% extends "admin/base.html" %}``,
   content in ``{% block main %}``; every ``<form method="post">`` carries
   ``{{ csrf_field() }}`` (a test checks each form of each page); styles go in
   static/admin.css, no inline style or script (the CSP refuses them).
3. Here: import the module and add its ``routes`` to ``routes``; add its nav entry to
   ``page.NAV``.
4. Tests: the security walk covers the new routes by itself; add a test of what the
   page does, signed in through ``tests/admin_kit.py``'s ``sign_in`` helper, and a browser
   test with axe in tests/browser/test_admin_*.py.
"""

from __future__ import annotations

from fediblog.web.admin import auth, dashboard
from fediblog.web.admin import followers as followers_section
from fediblog.web.admin import health as health_section
from fediblog.web.admin import responses as responses_section
from fediblog.web.admin import write as write_section
from fediblog.web.admin.guard import Guard

routes = [
    *auth.routes,
    *dashboard.routes,
    *responses_section.routes,
    *followers_section.routes,
    *health_section.routes,
    *write_section.routes,
]

__all__ = ["Guard", "routes"]
