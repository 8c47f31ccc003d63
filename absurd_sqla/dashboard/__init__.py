"""A web dashboard for absurd_sqla: an ASGI application to mount in your own
(FastAPI, Starlette, Litestar...) app, or to serve with ``absurd-sqla dashboard``.

    from absurd_sqla.dashboard import create_dashboard
    api.mount("/ops/absurd", create_dashboard(app, authorize=is_staff))

Needs the ``dashboard`` extra: ``pip install 'absurd_sqla[dashboard]'``.
"""

from .app import create_dashboard

__all__ = ["create_dashboard"]
