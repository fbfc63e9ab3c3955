"""Saved prompt states of idle sessions of the embedded model: RAM, then disk, both bounded."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from ..files import open_private, private_dir, process_alive


class StateStore:
    """Saved sequence states of idle sessions: newest in RAM, older on disk, both bounded."""

    def __init__(self, *, ram_bytes: int, disk_bytes: int, directory: Path | None) -> None:
        self.ram_bytes = ram_bytes
        self.disk_bytes = disk_bytes if directory is not None else 0
        self.directory = directory
        self._ram: OrderedDict[str, tuple[list[int], bytes | bytearray]] = OrderedDict()
        self._disk: OrderedDict[str, tuple[Path, int, list[int]]] = OrderedDict()
        self.ram_used = 0
        self.disk_used = 0
        self.dropped = 0
        if directory is not None:
            # Saved states belong to this process's context: each process keeps its own
            # folder, and folders of processes that are gone are removed.
            for other in directory.glob("*") if directory.is_dir() else []:
                if other.name.isdigit() and not process_alive(int(other.name)):
                    shutil.rmtree(other, ignore_errors=True)
            self.directory = directory / str(os.getpid())
            shutil.rmtree(self.directory, ignore_errors=True)
            private_dir(self.directory)

    def __contains__(self, session: str) -> bool:
        return session in self._ram or session in self._disk

    def put(self, session: str, tokens: list[int], data: bytes | bytearray) -> None:
        """Keep a session's state, pushing the oldest ones to disk and then out."""
        self.discard(session)
        self._ram[session] = (tokens, data)
        self.ram_used += len(data)
        while self.ram_used > self.ram_bytes and self._ram:
            old, (old_tokens, old_data) = self._ram.popitem(last=False)
            self.ram_used -= len(old_data)
            self._to_disk(old, old_tokens, old_data)

    def take(self, session: str) -> tuple[list[int], bytes | bytearray, str] | None:
        """Remove and return a session's state with where it was ("ram" or "disk")."""
        if session in self._ram:
            tokens, data = self._ram.pop(session)
            self.ram_used -= len(data)
            return tokens, data, "ram"
        if session in self._disk:
            path, size, _tokens = self._disk.pop(session)
            self.disk_used -= size
            try:
                raw = path.read_bytes()
            except OSError:
                return None
            finally:
                path.unlink(missing_ok=True)
            (count,) = struct.unpack_from("<Q", raw)
            tokens = list(struct.unpack_from(f"<{count}i", raw, 8))
            return tokens, raw[8 + 4 * count :], "disk"
        return None

    def discard(self, session: str) -> None:
        """Forget a session's saved state, wherever it is."""
        if session in self._ram:
            self.ram_used -= len(self._ram.pop(session)[1])
        if session in self._disk:
            path, size, _tokens = self._disk.pop(session)
            self.disk_used -= size
            path.unlink(missing_ok=True)

    def tokens(self, prefix: str) -> Iterator[tuple[str, list[int]]]:
        """The sessions whose names start with `prefix`, with the tokens their states hold."""
        for session, (tokens, _data) in self._ram.items():
            if session.startswith(prefix):
                yield session, tokens
        for session, (_path, _size, tokens) in self._disk.items():
            if session.startswith(prefix):
                yield session, tokens

    def _to_disk(self, session: str, tokens: list[int], data: bytes | bytearray) -> None:
        size = 8 + 4 * len(tokens) + len(data)
        if self.directory is None or size > self.disk_bytes:
            self.dropped += 1
            return
        while self.disk_used + size > self.disk_bytes and self._disk:
            _, (path, old_size, _tokens) = self._disk.popitem(last=False)
            self.disk_used -= old_size
            path.unlink(missing_ok=True)
            self.dropped += 1
        name = hashlib.sha256(session.encode()).hexdigest()[:40]
        path = self.directory / f"{name}.state"
        temp = path.with_suffix(".state.tmp")
        with open_private(temp) as out:
            out.write(struct.pack("<Q", len(tokens)))
            out.write(struct.pack(f"<{len(tokens)}i", *tokens))
            out.write(data)
        os.replace(temp, path)
        self._disk[session] = (path, size, tokens)
        self.disk_used += size
