"""Storage: one way to address a file (``Location``) and one policy for when the store fails.

- ``repa.storage.location``, the seam: the only module that touches fsspec. :class:`Location` (a
  URL with its fsspec options) and the operations every part of repa uses: ``exists``, ``size``,
  ``listdir``/``list_entries``, ``open_url``, ``read_bytes``, ``write_bytes_atomic``, ``remove``,
  ``move``, ``local_copy``.
- ``repa.storage.faults``, the policy: errors (:class:`StorageError`, one line naming operation, URL and fix),
  which failures are transient or the credentials', the deadline retry, the process's first
  failure, and the timeouts a verb installs when it starts (:func:`configure`).

``from repa import storage; storage.read_bytes(cfg.storage.locate(url))`` is the usual call.
"""

from repa.storage.faults import (
    Policy,
    StorageError,
    access_fix,
    configure,
    exception_chain,
    first_failure,
    is_access_error,
    is_transient,
    policy,
    reset_failures,
    retry,
)
from repa.storage.location import (
    Entry,
    Location,
    cache_dir,
    cleanup_temps,
    exists,
    filesystem,
    fs_options,
    is_local,
    join,
    list_entries,
    listdir,
    local_copy,
    local_path,
    locate,
    move,
    open_url,
    read_bytes,
    read_bytes_hashed,
    remove,
    size,
    write_bytes_atomic,
)

__all__ = [
    "Entry",
    "Location",
    "Policy",
    "StorageError",
    "access_fix",
    "cache_dir",
    "cleanup_temps",
    "configure",
    "exception_chain",
    "exists",
    "filesystem",
    "first_failure",
    "fs_options",
    "is_access_error",
    "is_local",
    "is_transient",
    "join",
    "list_entries",
    "listdir",
    "local_copy",
    "local_path",
    "locate",
    "move",
    "open_url",
    "policy",
    "read_bytes",
    "read_bytes_hashed",
    "remove",
    "reset_failures",
    "retry",
    "size",
    "write_bytes_atomic",
]
