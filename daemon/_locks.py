"""Locks: advisory (shared) and exclusive claims on a named resource, with a TTL.

Whether a lock may be taken is decided in the store, in the same write that
takes it, so daemons sharing a database agree. Time here is trio's clock
anchored to the wall clock at start: a TTL is a duration, and tests run it
under trio's autojump clock.
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta

import structlog
import trio
from chinwag.protocol import LockHolder, LockMode
from chinwag.storage import MailStore

from ._errors import RequestError

log = structlog.get_logger("chinwag.mail")

MAX_RESOURCE = 256
MAX_TTL_S = 7 * 86400


class Locks:
    def __init__(self, store: MailStore) -> None:
        self.store = store
        self._wall = datetime.now(UTC)
        self._start = trio.current_time()

    def now(self) -> datetime:
        return self._wall + timedelta(seconds=trio.current_time() - self._start)

    async def take(
        self, holder: str, resource: str, mode: LockMode, ttl_s: float
    ) -> tuple[bool, list[LockHolder], datetime | None]:
        """Take or renew ``holder``'s lock; (taken, the live holders, its expiry if taken)."""
        resource = _resource(resource)
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise RequestError(400, f"ttl_s must be between 1 and {MAX_TTL_S} seconds.")
        moment = self.now()
        lock = LockHolder(
            resource=resource,
            holder=holder,
            mode=mode,
            acquired_at=moment,
            expires_at=moment + timedelta(seconds=ttl_s),
        )
        acquired, holders = await self.store.take_lock(lock, moment)
        log.debug("lock_taken" if acquired else "lock_refused", resource=resource, holder=holder)
        return acquired, holders, lock.expires_at if acquired else None

    async def release(self, holder: str, resource: str) -> None:
        resource = _resource(resource)
        if not await self.store.release_lock(resource, holder, self.now()):
            raise RequestError(403, f"{holder} holds no lock on {resource}.")

    async def listed(self, resource: str | None, holder: str | None) -> list[LockHolder]:
        return await self.store.locks(self.now(), resource=resource, holder=holder)


def _resource(raw: str) -> str:
    if not raw.strip() or len(raw.encode()) > MAX_RESOURCE:
        raise RequestError(400, f"A resource is 1 to {MAX_RESOURCE} bytes, such as paths.py.")
    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise RequestError(400, "A resource must not contain control characters.")
    return raw
