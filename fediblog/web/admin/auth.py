"""Signing in and out of the desk.

* ``GET /admin/login``: the sign-in form (the only admin page without a session).
* ``POST /admin/login``: name and password; a session cookie and a redirect to
  ``next`` (a path under /admin only), or the same refusal whatever was wrong.
* ``POST /admin/logout``: ends this session; ``POST /admin/signout-all`` ends every one.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from fediblog.desk import SIGN_IN_FAILED, SignInFailed, SignInLimited
from fediblog.web.admin.guard import (
    LOGIN_PATH,
    clear_session_cookie,
    cookie_name,
    safe_next,
    set_session_cookie,
    signed_in,
)
from fediblog.web.deps import Services, services

MAX_LOGIN_FORM = 10_000


async def _login_page(
    request: Request, ctx: Services, *, next_path: str, message: str = "", status: int = 200
) -> Response:
    body = ctx.templates.get_template("admin/login.html").render(
        site=ctx.settings,
        title="Sign in",
        next_path=next_path,
        message=message,
        has_password=await ctx.desk.has_password(),
        signed=False,
    )
    return HTMLResponse(body, status_code=status)


async def login_form(request: Request) -> Response:
    ctx = services(request)
    next_path = safe_next(request.query_params.get("next"))
    if await ctx.desk.session_for(request.cookies.get(cookie_name(ctx.settings))):
        return RedirectResponse(next_path, status_code=303)
    return await _login_page(request, ctx, next_path=next_path)


async def login(request: Request) -> Response:
    ctx = services(request)
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > MAX_LOGIN_FORM:
        return await _login_page(
            request, ctx, next_path="/admin", message=SIGN_IN_FAILED, status=413
        )
    form = await request.form(max_files=0, max_fields=10)
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    next_path = safe_next(fields.get("next"))
    try:
        signed = await ctx.desk.sign_in(
            fields.get("username", ""),
            fields.get("password", ""),
            ip=request.client.host if request.client else "unknown",
            user_agent=request.headers.get("user-agent", ""),
        )
    except SignInLimited as limited:
        response = await _login_page(
            request, ctx, next_path=next_path, message=str(limited), status=429
        )
        response.headers["Retry-After"] = str(limited.retry_after)
        return response
    except SignInFailed:
        return await _login_page(
            request, ctx, next_path=next_path, message=SIGN_IN_FAILED, status=403
        )
    response = RedirectResponse(next_path, status_code=303)
    set_session_cookie(response, ctx.settings, signed.token)
    return response


async def logout(request: Request) -> Response:
    ctx = services(request)
    await ctx.desk.sign_out(signed_in(request).token)
    return _signed_out(ctx)


async def signout_all(request: Request) -> Response:
    ctx = services(request)
    await ctx.desk.sign_out_everywhere()
    return _signed_out(ctx)


def _signed_out(ctx: Services) -> Response:
    response = RedirectResponse(LOGIN_PATH, status_code=303)
    clear_session_cookie(response, ctx.settings)
    return response


routes = [
    Route("/admin/login", login_form, methods=["GET"]),
    Route("/admin/login", login, methods=["POST"]),
    Route("/admin/logout", logout, methods=["POST"]),
    Route("/admin/signout-all", signout_all, methods=["POST"]),
]
