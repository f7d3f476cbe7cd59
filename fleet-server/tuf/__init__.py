"""The TUF image repository on the fleet server: online keys, storage and signing, HTTP routes.

- :mod:`.keys`: the online snapshot/timestamp/director keys under ``DATA/tuf/`` (made by ``server init``).
- :mod:`.repository`: :class:`ImageRepository`, metadata in the ``tuf_metadata`` table, online signing.
- :mod:`.routes`: ``/tuf/image/...``.
"""

from __future__ import annotations

from edgefleet.server.tuf.keys import OnlineKeys, create_online_keys, has_online_keys, load_online_keys
from edgefleet.server.tuf.repository import IMAGE, ImageRepository, NotFound, RegistryMismatch

__all__ = [
    "IMAGE",
    "ImageRepository",
    "NotFound",
    "OnlineKeys",
    "RegistryMismatch",
    "create_online_keys",
    "has_online_keys",
    "load_online_keys",
]
