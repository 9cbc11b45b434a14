"""The registry's error type: one exception, one JSON shape.

Every failure a client sees is rendered from a `RegistryError`: the HTTP layer
raises them, and nixery/error_handlers.py translates every other module's
exceptions into them, so no code path answers with HTML or a bare status.
"""

from __future__ import annotations

import json
from typing import Any, Optional


class RegistryError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: Optional[Any] = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers: dict[str, str] = {}

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


def manifest_unknown(message: str, detail: Any = None) -> RegistryError:
    return RegistryError(404, "MANIFEST_UNKNOWN", message, detail)


def blob_unknown(digest: str) -> RegistryError:
    return RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": digest})


def build_failed(reason: str) -> RegistryError:
    return RegistryError(500, "UNKNOWN", reason)


def unavailable(reason: str) -> RegistryError:
    return RegistryError(503, "UNAVAILABLE", reason)


def internal_error(error: BaseException) -> RegistryError:
    """What a client is told of a bug: the exception's type, never its message (which may hold paths or secrets)."""
    return RegistryError(500, "UNKNOWN", f"internal error: {type(error).__name__}")
