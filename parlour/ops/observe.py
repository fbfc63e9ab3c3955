"""What the core reports about each generation; the default observer records nothing.

The engine holds one Observer; every generation asks it for a Watch and tells the watch
when it got its turn lock, began generating, produced its first text, what it produced,
and when it ended. parlour.metrics implements them for Prometheus.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..turns.request import Generated


class Watch:
    """One generation as an observer follows it; these defaults do nothing."""

    def lock_waited(self, seconds: float) -> None:
        """The turn waited this long for its conversation's lock."""

    def generating(self) -> None:
        """The backend was asked for the reply."""

    def first_token(self) -> None:
        """The first text arrived."""

    def generated(self, result: Generated) -> None:
        """The backend finished (or was stopped) with these token counts."""

    def done(self, model: str | None) -> None:
        """The generation ended, however it ended (called once or more, before its result
        is visible); `model` served it, if one was chosen."""


class Observer:
    """Hands each generation a Watch; this one hands out a watch that records nothing."""

    def __init__(self) -> None:
        self._silent = Watch()

    def watch(self) -> Watch:
        """A watch for a generation that is starting now."""
        return self._silent


class Observers(Observer):
    """Several observers told about the same generations."""

    def __init__(self, *observers: Observer) -> None:
        super().__init__()
        self.observers = observers

    def watch(self) -> Watch:
        """A watch that tells each observer's own watch."""
        return _Watches([observer.watch() for observer in self.observers])


class _Watches(Watch):
    __slots__ = ("watches",)

    def __init__(self, watches: list[Watch]) -> None:
        self.watches = watches

    def lock_waited(self, seconds: float) -> None:
        for watch in self.watches:
            watch.lock_waited(seconds)

    def generating(self) -> None:
        for watch in self.watches:
            watch.generating()

    def first_token(self) -> None:
        for watch in self.watches:
            watch.first_token()

    def generated(self, result: Generated) -> None:
        for watch in self.watches:
            watch.generated(result)

    def done(self, model: str | None) -> None:
        for watch in self.watches:
            watch.done(model)
