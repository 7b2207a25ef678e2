"""uvicorn's HTTP/1.1 protocol (h11), except that a request it cannot even parse gets OpenAI's JSON error body.

uvicorn answers such requests itself, before the app sees them, with a plain-text "Invalid HTTP request received.";
clients that parse every error as `{"error": {...}}` then fail on the body instead of reporting the 400.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class OpenAIErrorH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": {"message": f"malformed HTTP request ({msg.rstrip('.')}); check the request line "
                                                "and headers", "type": "invalid_request_error", "param": None,
                                     "code": None}}).encode("utf-8")
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii")),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
