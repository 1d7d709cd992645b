"""The user's text as the commands read it: stdin, piped lines and arguments, strict UTF-8.

Python turns bytes that are not UTF-8 into lone surrogates (in argv, or stdin under a C
locale), which the tokenizer then rejects with a traceback. Here they are one clear error.
"""

from typing import IO, Optional


def decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start}") from None


def check_text(text: Optional[str], what: str) -> Optional[str]:
    """`text` as given, unless it holds bytes that were not UTF-8."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{what} is not UTF-8 text: a bad byte at character {e.start}") from None
    return text


def read_all(stream: IO, what: str) -> str:
    binary = getattr(stream, "buffer", None)
    return decode_text(binary.read(), what) if binary is not None else check_text(stream.read(), what)


def read_line(stream: IO, what: str) -> Optional[str]:
    """The next line without its line end; None at the end of the input."""
    binary = getattr(stream, "buffer", None)
    line = binary.readline() if binary is not None else stream.readline()
    if not line:
        return None
    text = decode_text(line, what) if isinstance(line, bytes) else check_text(line, what)
    return text.removesuffix("\n").removesuffix("\r")
