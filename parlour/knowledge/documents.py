"""Reading documents (text, Markdown, PDF) and splitting them into overlapping chunks.

Chunk sizes are counted in approximate tokens: words times TOKENS_PER_WORD, which is close
to what subword tokenizers produce for English prose. Knowledge bases are shared by every
model, so they are not tied to one model's tokenizer; the context builder counts the real
tokens of what it finally sends.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from ..errors import InvalidRequest

TOKENS_PER_WORD = 1.3
#: Target chunk size and the overlap between neighbouring chunks, in approximate tokens.
CHUNK_TOKENS = 300
OVERLAP_TOKENS = 60

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".log"})
SUPPORTED = "text (.txt), Markdown (.md) and PDF (.pdf)"

_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")


def approx_tokens(text: str) -> int:
    """Approximate tokens of `text`: its words times TOKENS_PER_WORD, rounded."""
    return int(len(text.split()) * TOKENS_PER_WORD + 0.5)


@dataclass
class SourceDocument:
    """A file read into memory, ready to be split page by page."""

    name: str
    data: bytes
    kind: str  # "text" or "pdf"
    page_count: int
    _reader: Any = field(default=None, repr=False)
    _loaded: list[str] | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """Hex digest of the raw bytes: the same file always has the same digest."""
        return hashlib.sha256(self.data).hexdigest()

    def load(self, on_page: Callable[[], None] | None = None) -> None:
        """Extract every page now (slow for big PDFs: callers may run this in a thread)."""
        if self._loaded is not None:
            return
        loaded: list[str] = []
        for text in self._extract():
            loaded.append(text)
            if on_page is not None:
                on_page()
        self._loaded = loaded

    def pages(self) -> Iterator[str]:
        """The text of each page (one page for text files), in order."""
        if self._loaded is not None:
            yield from self._loaded
        else:
            yield from self._extract()

    def _extract(self) -> Iterator[str]:
        if self.kind == "pdf":
            for number, page in enumerate(self._reader.pages, start=1):
                try:
                    yield page.extract_text() or ""
                except Exception as exc:  # pypdf raises many types on damaged pages
                    raise InvalidRequest(
                        f"Cannot read page {number} of {self.name}: {exc}. Re-save the PDF or "
                        "export it to text."
                    ) from exc
        else:
            yield decode_text(self.name, self.data)


def decode_text(name: str, data: bytes) -> str:
    """Text of a file: UTF-8 (with or without BOM), else Windows-1252; binary data is refused."""
    if b"\x00" in data[:8192]:
        raise InvalidRequest(f"{name} looks like a binary file; send {SUPPORTED} files.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def open_document(name: str, data: bytes) -> SourceDocument:
    """Recognise a file by its name and first bytes; refuse what cannot be indexed."""
    clean = PurePath(name.replace("\\", "/")).name or "document"
    suffix = PurePath(clean).suffix.lower()
    if suffix == ".pdf" or data.startswith(b"%PDF-"):
        return _open_pdf(clean, data)
    if suffix and suffix not in TEXT_SUFFIXES and b"\x00" in data[:8192]:
        raise InvalidRequest(f"Cannot index {clean}: only {SUPPORTED} files are supported.")
    decode_text(clean, data)
    return SourceDocument(name=clean, data=data, kind="text", page_count=1)


def _open_pdf(name: str, data: bytes) -> SourceDocument:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InvalidRequest(f"{name} is encrypted; remove the password and add it again.")
        pages = len(reader.pages)
    except InvalidRequest:
        raise
    except (PdfReadError, ValueError, KeyError, OSError) as exc:
        raise InvalidRequest(f"Cannot read {name} as a PDF: {exc}.") from exc
    return SourceDocument(name=name, data=data, kind="pdf", page_count=pages, _reader=reader)


@dataclass(frozen=True)
class ChunkDraft:
    """A chunk before it is stored: its text, the page it starts on and its size."""

    content: str
    page: int | None
    token_count: int


@dataclass(frozen=True)
class _Unit:
    text: str
    words: int
    page: int | None
    paragraph_start: bool


def _units(text: str, page: int | None, max_words: int) -> Iterator[_Unit]:
    """Sentences of `text`, with sentences longer than a chunk cut into word windows."""
    for paragraph in _PARAGRAPH.split(text):
        first = True
        for sentence in _SENTENCE.split(paragraph.strip()):
            words = sentence.split()
            for start in range(0, len(words), max_words):
                piece = words[start : start + max_words]
                if piece:
                    yield _Unit(" ".join(piece), len(piece), page, first)
                    first = False


def _join(units: list[_Unit]) -> str:
    parts: list[str] = []
    for i, unit in enumerate(units):
        if i:
            parts.append("\n\n" if unit.paragraph_start else " ")
        parts.append(unit.text)
    return "".join(parts)


def chunk_pages(
    pages: Iterator[tuple[int | None, str]],
    *,
    chunk_tokens: int = CHUNK_TOKENS,
    overlap_tokens: int = OVERLAP_TOKENS,
) -> Iterator[ChunkDraft]:
    """Pack sentences into chunks of about `chunk_tokens`, each starting with the last
    `overlap_tokens` or so of the previous chunk of the same page, so no passage is cut off
    from its context."""
    max_words = max(1, int(chunk_tokens / TOKENS_PER_WORD))
    overlap_words = max(0, int(overlap_tokens / TOKENS_PER_WORD))
    current: list[_Unit] = []
    fresh = False  # whether `current` holds anything not already emitted

    def emit() -> ChunkDraft:
        text = _join(current)
        return ChunkDraft(content=text, page=current[0].page, token_count=approx_tokens(text))

    def carry() -> list[_Unit]:
        kept: list[_Unit] = []
        words = 0
        for unit in reversed(current):
            if words + unit.words > overlap_words:
                break
            kept.insert(0, unit)
            words += unit.words
        if not kept and overlap_words and current:
            # The last sentence alone is longer than the overlap: keep its tail.
            tail = current[-1].text.split()[-overlap_words:]
            kept = [_Unit(" ".join(tail), len(tail), current[-1].page, True)]
        return kept

    for page, text in pages:
        if current and current[-1].page != page:
            # Chunks stay within a page so every source can cite its page.
            if fresh:
                yield emit()
            current, fresh = [], False
        for unit in _units(text, page, max_words):
            if fresh and sum(u.words for u in current) + unit.words > max_words:
                yield emit()
                current = carry()
                while current and sum(u.words for u in current) + unit.words > max_words:
                    current.pop(0)
            current.append(unit)
            fresh = True
    if fresh:
        yield emit()
