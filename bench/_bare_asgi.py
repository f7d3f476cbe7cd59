"""The floor for an HTTP round trip in Python: a bare ASGI app on uvicorn that reads the request
body and answers with a fixed JSON body of the size the agent's answer has. No parsing, no model."""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

RESPONSE = b""


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        msg = await receive()
        more = msg.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(RESPONSE)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": RESPONSE})


if __name__ == "__main__":
    port, size = int(sys.argv[1]), int(sys.argv[2])
    RESPONSE = b'{"x": "' + b"0" * max(0, size - 9) + b'"}'
    uvicorn.run(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False)
