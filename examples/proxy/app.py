"""A proxied route: the edge relays WebSockets to another WebSocket server.

``/feed/{topic}`` goes to ``UPSTREAM`` (default ``ws://127.0.0.1:9001/echo/{topic}``) after the
edge's rules: a token in the query string (``on_before_connect``, the identity goes upstream
as ``X-Rooms-Identity``) and the server's per-address limits; usage is accounted as for rooms.

Try it with the echo example as the upstream (any WebSocket server will do)::

    rooms serve examples.echo.app:app --port 9001 --data-dir data/upstream &
    rooms serve examples.proxy.app:app --data-dir data/proxy &
    rooms connect 'ws://127.0.0.1:8000/feed/news?token=demo'
"""

import os

from rooms import App, HTTPError, Request

UPSTREAM = os.environ.get("UPSTREAM", "ws://127.0.0.1:9001/echo/{topic}")


async def check_token(request: Request) -> str:
    """Refuse the upgrade (401) without a token; name the user for the upstream."""
    token = request.query_param("token")
    if not token:
        raise HTTPError(401, "add ?token=... to the URL")
    return f"user-{token}"


app = App()
app.proxy("/feed/{topic}", UPSTREAM, on_before_connect=check_token)
