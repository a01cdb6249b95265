"""moto's S3 server checks ``If-None-Match`` / ``If-Match`` on PUT, then stores the object, as two
steps; two PUTs in flight on its threads can both pass the check. AWS S3 makes the check and the
write one step (a loser gets 412, or 409 ``ConditionalRequestConflict``). :func:`serialize_puts`
puts moto's PUT handler under one lock so that the lease race tests (tests/integration/test_lease.py)
test repa, not moto's threading.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()


def serialize_puts() -> None:
    """Make moto's ``put_object`` (condition check + store) atomic; idempotent."""
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "serialized", False):
        return
    original = S3Response.put_object

    def put_object(self: Any) -> Any:
        with _LOCK:
            return original(self)

    put_object.serialized = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]
