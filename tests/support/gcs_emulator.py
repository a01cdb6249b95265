"""A local GCS for tests: ``gcp-storage-emulator`` (the GCS JSON API in pure Python, in memory) on
127.0.0.1, taught the call gcsfs makes that it lacks and the preconditions the run lease relies on.

gcsfs renames within a bucket with ``objects.move`` (``POST .../o/SRC/moveTo/o/DST``,
https://cloud.google.com/storage/docs/json_api/v1/objects/move) and falls back to copy + delete only
after six retries of the emulator's 501 (about 30 s per rename). :func:`start` adds that route,
served as the emulator's own rewrite followed by its delete, and returns the running server.

The emulator ignores ``ifGenerationMatch`` (https://cloud.google.com/storage/docs/request-preconditions),
which ``repa.storage.conditional`` sends for the lease: ``0`` on create, the read generation on replace and
delete. :func:`start` wraps its upload and delete handlers so that a request whose condition does not
hold gets GCS's ``412 Precondition Failed``, with the check and the write under one lock (the server
answers each connection in its own thread).
"""

from __future__ import annotations

import socket
import threading
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


_WRITE_LOCK = threading.Lock()


def _object_name(request: Any) -> str | None:
    if "object_id" in request.params:
        return request.params["object_id"]
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    return data.get("meta", {}).get("name") if isinstance(data, dict) else None


def _conditional(handler: Any) -> Any:
    """``handler`` run only if ``ifGenerationMatch`` (when given) equals the object's generation
    (0: the object must not exist); otherwise 412, as GCS answers."""

    def wrapped(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> Any:
        from gcp_storage_emulator.exceptions import NotFound

        with _WRITE_LOCK:
            wanted = request.query.get("ifGenerationMatch")
            if wanted is not None:
                try:
                    current = str(
                        storage.get_file_obj(request.params["bucket_name"], _object_name(request))[
                            "generation"
                        ]
                    )
                except NotFound:
                    current = "0"
                if current != wanted[0]:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    message = f"ifGenerationMatch={wanted[0]}: the generation is {current}"
                    response.json(
                        {"error": {"code": 412, "message": message, "errors": [{"message": message}]}}
                    )
                    return None
            return handler(request, response, storage, *args, **kwargs)

    wrapped.conditional = True  # type: ignore[attr-defined]
    return wrapped


def _add_conditions() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.insert, "conditional", False):
        return
    wraps = {objects.insert: _conditional(objects.insert), objects.delete: _conditional(objects.delete)}
    objects.insert = wraps[objects.insert]  # the server's fallback for uploads looks it up here
    server.HANDLERS = tuple(
        (regex, {method: wraps.get(fn, fn) for method, fn in handlers.items()})
        for regex, handlers in server.HANDLERS
    )


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
    _add_conditions()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    return server, f"http://127.0.0.1:{port}"
