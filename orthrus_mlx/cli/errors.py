"""The error a server request is refused with, shared by the OpenAI and Anthropic front ends."""

from typing import Optional


class RequestError(ValueError):
    """A request the server refuses, with its HTTP status and the offending field."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param
