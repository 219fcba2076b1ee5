"""The server's errors, as OpenAI error objects: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
         504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def raw(self) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers, body) for a plain ASGI response (before the app has a Request)."""
        data = json.dumps(self.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                   (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        return self.status, headers, data
