"""Shared by the server tests: one request over a real socket, parsed."""

import http.client
import json
import socket
from typing import Any, Tuple


def request(server, method: str, path: str, body=None, headers=None, timeout: float = 60) -> Tuple[int, Any]:
    """(status, parsed JSON body or raw text) of one request to `server` = (host, port, ...)."""
    conn = http.client.HTTPConnection(server[0], server[1], timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(data)
    except json.JSONDecodeError:
        return response.status, data


def raw_http(server, data: bytes, timeout: float = 30) -> Tuple[int, str]:
    """(status, body) of raw bytes sent as they are, for requests http.client will not write."""
    with socket.create_connection(server[:2], timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # nothing more is coming
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()
