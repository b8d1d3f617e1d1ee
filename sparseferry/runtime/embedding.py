"""Input embeddings read by row from the checkpoint, instead of held in memory.

A forward pass needs one embedding row per input token: for a 32k x 2048 bf16 table that is 4 KiB
of its 128 MiB per token. When the table is not tied to the output head, keeping it resident only
takes budget from decoder layers, so under a budget it stays in its file and the rows a step needs
are read with pread (the table was checksum-verified once at load).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..store import Checkpoint, CheckpointError


class RowReader:
    """Reads rows of a dense 2-D tensor stored in a checkpoint file."""

    def __init__(self, ckpt: Checkpoint, name: str, verify: bool = True):
        e = ckpt.tensors[name]
        part = e.parts["dense"]
        self.name = name
        self.path = ckpt.path / e.file
        self.offset, self.nbytes = part["offset"], part["nbytes"]
        self.rows, self.cols = e.shape
        self.dtype = e.dtype
        self.row_bytes = self.cols * self.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDONLY)
        if verify:
            self._verify(part["digest"], name)

    def _verify(self, want: str, name: str) -> None:
        import xxhash

        h = xxhash.xxh3_64()
        chunk = 8 << 20  # held while hashed: small, it is outside the budget
        for start in range(0, self.nbytes, chunk):
            h.update(os.pread(self.fd, min(chunk, self.nbytes - start), self.offset + start))
        if h.hexdigest() != want:
            raise CheckpointError(f"{self.path}: checksum mismatch in {name}")
        os.posix_fadvise(self.fd, self.offset, self.nbytes, os.POSIX_FADV_DONTNEED)

    def rows_of(self, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[*ids.shape, cols] rows for the token ids."""
        flat = ids.reshape(-1).tolist()
        uniq = sorted(set(flat))
        if uniq and (uniq[0] < 0 or uniq[-1] >= self.rows):
            raise IndexError(f"token id out of range [0, {self.rows}): {uniq[0] if uniq[0] < 0 else uniq[-1]}")
        buf = bytearray(len(uniq) * self.row_bytes)
        mv = memoryview(buf)
        for k, t in enumerate(uniq):
            got = os.preadv(self.fd, [mv[k * self.row_bytes : (k + 1) * self.row_bytes]], self.offset + t * self.row_bytes)
            if got != self.row_bytes:
                raise CheckpointError(f"{self.path}: short read of embedding row {t}")
        table = torch.frombuffer(buf, dtype=self.dtype).view(len(uniq), self.cols) if uniq else torch.empty(0, self.cols, dtype=self.dtype)
        index = torch.tensor(_positions(flat, uniq), dtype=torch.long)
        return table[index].view(*ids.shape, self.cols).to(device)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _positions(flat: list[int], uniq: list[int]) -> list[int]:
    where = {t: k for k, t in enumerate(uniq)}
    return [where[t] for t in flat]


def embed_on_demand(module: nn.Embedding, reader: RowReader, device: torch.device) -> None:
    """Make `module` read its rows through `reader`; its weight becomes an empty [0, cols] placeholder
    (so model.device / model.dtype still report the truth)."""
    module._parameters["weight"] = nn.Parameter(torch.empty(0, reader.cols, dtype=reader.dtype, device=device),
                                                requires_grad=False)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return reader.rows_of(ids, device)

    module.forward = forward
    module._sf_rows = reader
