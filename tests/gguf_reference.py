"""A minimal GGUF reader in numpy, written from the file format's description (ggml's
docs/gguf.md) and sharing no code with the package or with MLX's reader.

Enough for SmolLM2's file: metadata is skipped over, tensors are F32, F16, Q4_1 or Q8_0,
and they come back dequantized, rows exactly as stored (Q/K in llama.cpp's rotary order).
"""

import struct

import numpy as np

# Value types of metadata entries: their struct format (8: string, 9: array).
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8
BLOCK = 32  # values per quantization block


class GGUFFile:
    def __init__(self, path):
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0
        magic, version, n_tensors, n_meta = self.unpack("<4sIQQ")
        assert magic == b"GGUF" and version >= 2, (magic, version)
        self.meta = dict(self.entry() for _ in range(n_meta))
        self.tensors = {}
        for _ in range(n_tensors):
            name = self.string()
            (n_dims,) = self.unpack("<I")
            dims = self.unpack(f"<{n_dims}Q")
            kind, offset = self.unpack("<IQ")
            self.tensors[name] = (tuple(reversed(dims)), kind, offset)  # ggml lists the row length first
        alignment = self.meta.get("general.alignment", 32)
        self.start = -(-self.pos // alignment) * alignment

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        values = struct.unpack(fmt, self.data[self.pos : self.pos + size].tobytes())
        self.pos += size
        return values

    def string(self):
        (n,) = self.unpack("<Q")
        self.pos += n
        return self.data[self.pos - n : self.pos].tobytes().decode("utf-8")

    def value(self, kind):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, count = self.unpack("<IQ")
            return [self.value(item) for _ in range(count)]
        return self.unpack("<" + SCALARS[kind])[0]

    def entry(self):
        key = self.string()
        (kind,) = self.unpack("<I")
        return key, self.value(kind)

    def __getitem__(self, name):
        """The tensor as float32, shape as numpy sees it (rows, row length)."""
        shape, kind, offset = self.tensors[name]
        count = int(np.prod(shape))
        raw = self.data[self.start + offset :]
        if kind == F32:
            return raw[: 4 * count].view(np.float32).reshape(shape).copy()
        if kind == F16:
            return raw[: 2 * count].view(np.float16).astype(np.float32).reshape(shape)
        blocks = count // BLOCK
        if kind == Q4_1:  # per block: f16 scale d, f16 minimum m, 16 bytes of 4-bit codes
            b = raw[: blocks * 20].reshape(blocks, 20)
            d, m = b[:, 0:2].copy().view(np.float16), b[:, 2:4].copy().view(np.float16)
            codes = b[:, 4:]
            q = np.concatenate([codes & 0x0F, codes >> 4], axis=1)  # low nibbles: values 0-15
            return (q * d.astype(np.float32) + m.astype(np.float32)).reshape(shape)
        if kind == Q8_0:  # per block: f16 scale d, 32 signed bytes
            b = raw[: blocks * 34].reshape(blocks, 34)
            d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
            return (b[:, 2:].copy().view(np.int8) * d).reshape(shape)
        raise NotImplementedError(f"ggml type {kind} of {name}")
