"""A local GCS for tests: ``gcp-storage-emulator`` (the GCS JSON API in pure Python, in memory) on
127.0.0.1, taught the one call gcsfs makes that it lacks.

gcsfs renames within a bucket with ``objects.move`` (``POST .../o/SRC/moveTo/o/DST``,
https://cloud.google.com/storage/docs/json_api/v1/objects/move) and falls back to copy + delete only
after six retries of the emulator's 501 (about 30 s per rename). :func:`start` adds that route,
served as the emulator's own rewrite followed by its delete, and returns the running server.
"""

from __future__ import annotations

import socket
from http import HTTPStatus
from typing import Any


def _move(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
    from gcp_storage_emulator.handlers import objects

    params = request.params
    params["dest_bucket_name"] = params["bucket_name"]
    objects.rewrite(request, response, storage)
    if response.status == HTTPStatus.OK:
        objects._delete(storage, params["bucket_name"], params["object_id"])
        response.json(storage.get_file_obj(params["bucket_name"], params["dest_object_id"]))


def _add_move_route() -> None:
    from gcp_storage_emulator import server, settings

    route = (
        rf"^{settings.API_ENDPOINT}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
        r"(?P<dest_object_id>.*[^/]+)$",
        {"POST": _move},
    )
    if route[0] not in {regex for regex, _ in server.HANDLERS}:
        server.HANDLERS = (route, *server.HANDLERS)  # before the generic object path


def start() -> tuple[Any, str]:
    """Start an in-memory emulator on a free loopback port; returns ``(server, endpoint URL)``."""
    from gcp_storage_emulator.server import create_server

    _add_move_route()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    return server, f"http://127.0.0.1:{port}"
