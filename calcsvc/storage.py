"""A breaker's state kept in Redis, so that a fleet of processes trips as one.

Every process whose breaker has the same name and the same Redis shares one
state, one count of consecutive failures, one open time and one budget of
trial calls: once ``fail_max`` calls have failed anywhere in the fleet, every
process rejects calls, and after the reset timeout one process makes the
trial call for all of them. The keys live under ``calcsvc:breaker:<name>:``.

:class:`RedisStorage` is a :class:`pybreaker.CircuitRedisStorage` that fixes
what pybreaker's own gets wrong for a fleet:

- The open time is kept in milliseconds, not whole seconds: pybreaker's
  rounds it down, so a 2 s reset timeout could end after 1 s. It is set
  together with the open state, in one command.
- Half-open trial calls are counted in Redis, per trip, so the fleet sends
  ``half_open_max_calls`` of them in all, not that many per process. Only a
  process that still sees the breaker open may turn it half-open (a
  compare-and-set), so a process that saw "open" a moment ago cannot undo
  another's recovery or turn a breaker that has just opened again
  half-open. A trial slot held by a process that died is freed
  after the reset timeout.
- Redis being down never blocks a call and never raises: every command has
  a short connect and read timeout and no retries, and after a failure the
  storage leaves Redis alone for ``retry_after`` seconds, working on its
  local copy of the state. It logs one WARNING when Redis is lost and one
  INFO when it is back, and reports each failed command to its error hooks
  (``circuit_breaker_storage_errors_total``), where pybreaker logs a stack
  trace per command and waits on the socket each time.
- pybreaker's constructor talks to Redis, so a client could not start while
  Redis is down; this one does not.
- A state Redis does not have (Redis restarted empty, or the keys were
  deleted) or cannot name is seeded from the local copy, not reset to
  closed: an open breaker stays open across a Redis restart.

Two fixes live in :class:`calcsvc.breaker.Breaker`, which this storage is
made for: a breaker that notices a state another process set does not reset
the shared counters (pybreaker's states reset them whenever they are
created, wiping failures the fleet has counted since), and it claims trial
calls here through :meth:`RedisStorage.claim_trial`.

Each decision of a breaker reads the state from Redis, so a call costs a few
round trips to Redis; ``docs/benchmarks.md`` has the figures. The reset
timeout is measured against each host's own clock, so hosts' clocks should
agree to well within it.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TypeVar

import pybreaker
import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from calcsvc.client import is_redis_url

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a Redis command may take to connect, and to answer, before the
# breaker decides on its local state instead.
DEFAULT_TIMEOUT = 0.25
# Seconds to work on the local state after Redis failed, before trying it again.
DEFAULT_RETRY_AFTER = 1.0

STATES: Final = (
    pybreaker.STATE_CLOSED,
    pybreaker.STATE_OPEN,
    pybreaker.STATE_HALF_OPEN,
)

# Turn the breaker half-open only if it is still open, since the same trip.
_HALF_OPEN = """
local opened_at = redis.call('GET', KEYS[2]) or ''
if redis.call('GET', KEYS[1]) == ARGV[1] and opened_at == ARGV[3] then
    redis.call('SET', KEYS[1], ARGV[2])
end
"""
# Open the breaker, moving its open time forward, never back: the latest
# trip sets it. Both change at once, or a process could claim a trial call
# of the new trip while the breaker still looks half-open.
_OPEN = """
local current = tonumber(redis.call('GET', KEYS[1]))
if not current or tonumber(ARGV[1]) > current then
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('SET', KEYS[2], ARGV[2])
"""
# Claim a trial call of the trip that opened the breaker at KEYS[1]'s time,
# if the breaker is half-open still.
_CLAIM = """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then
    return false
end
local key = KEYS[2] .. ':' .. (redis.call('GET', KEYS[1]) or '0')
local claimed = redis.call('INCR', key)
redis.call('PEXPIRE', key, ARGV[2])
if claimed > tonumber(ARGV[1]) then
    redis.call('DECR', key)
    return false
end
return key
"""
_RELEASE = """
local claimed = tonumber(redis.call('GET', KEYS[1]))
if claimed and claimed > 0 then
    redis.call('DECR', KEYS[1])
end
"""

# The claim of a trial call made while Redis is unreachable.
LOCAL_CLAIM: Final = "local"


class _Unreachable:
    """What a Redis command returns while Redis cannot be reached."""


_UNREACHABLE = _Unreachable()


class RedisStorage(pybreaker.CircuitRedisStorage):
    """Keeps one breaker's state in Redis, shared by every process that uses it.

    ``name`` is the breaker's name, and chooses the keys; ``client`` should
    have short timeouts and no retries, as :meth:`from_url` sets them. See
    the module's documentation for what this storage does differently from
    pybreaker's.
    """

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        retry_after: float = DEFAULT_RETRY_AFTER,
    ) -> None:
        """Keep the state of breaker ``name`` in Redis through ``client``."""
        # pybreaker's constructor writes to Redis, which may be down.
        pybreaker.CircuitBreakerStorage.__init__(self, "redis")
        self._redis = client
        # pybreaker's _namespace() builds the keys from it; the other
        # attributes its constructor sets serve methods overridden here.
        self._namespace_name = f"calcsvc:breaker:{name}"

        self.breaker_name = name
        self.retry_after = retry_after
        self.error_hooks: list[Callable[[RedisStorage, BaseException], None]] = []
        self._local = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        # The last open time read, and the datetime made of it, kept so that
        # the breaker sees the same object until the breaker opens again.
        self._opened_at: tuple[bytes | None, datetime | None] = (None, None)

        self._key_state = self._namespace("state")
        self._key_failures = self._namespace("fail_counter")
        self._key_successes = self._namespace("success_counter")
        self._key_opened_at = self._namespace("opened_at")
        self._key_trials = self._namespace("trials")
        self._half_open = client.register_script(_HALF_OPEN)
        self._open = client.register_script(_OPEN)
        self._claim = client.register_script(_CLAIM)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls,
        url: str,
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
    ) -> RedisStorage:
        """Keep breaker ``name``'s state at ``url``, such as ``redis://host:6379/0``.

        Each Redis command gets ``timeout`` seconds to connect and as many to
        answer, and is not retried: the breaker has its local state to go on.

        Raises:
            ValueError: ``url`` is not a Redis URL.

        """
        if not is_redis_url(url):
            raise ValueError(
                f"not a Redis URL (redis://HOST:PORT/DB, rediss://, unix://): {url!r}"
            )
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, name, retry_after=retry_after)

    @property
    def reachable(self) -> bool:
        """Whether the last command reached Redis."""
        return not self._down

    def close(self) -> None:
        """Close the connections to Redis."""
        self._redis.close()

    @property
    def state(self) -> str:
        """Return the shared state, or the local one while Redis is unreachable."""
        raw = self._shared(lambda r: r.get(self._key_state))
        if isinstance(raw, _Unreachable):
            return self._local.state

        state = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None
        if state not in STATES:
            self._seed(overwrite=state is not None)
            return self._local.state
        self._local.state = state
        return state

    @state.setter
    def state(self, state: str) -> None:
        """Set the state; only a breaker open since the same trip turns half-open."""
        self._local.state = state
        if state == pybreaker.STATE_HALF_OPEN:
            # The breaker found the reset timeout over for the open time it
            # read last; if the breaker opened again since, that is stale.
            seen = self._opened_at[0] or b""
            self._shared(
                lambda _: self._half_open(
                    keys=[self._key_state, self._key_opened_at],
                    args=[pybreaker.STATE_OPEN, state, seen],
                )
            )
        else:
            self._shared(lambda r: r.set(self._key_state, state))

    def increment_counter(self) -> None:
        """Count one more consecutive failure."""
        self._local.increment_counter()
        self._shared(lambda r: r.incr(self._key_failures))

    def reset_counter(self) -> None:
        """Set the count of consecutive failures to zero."""
        self._local.reset_counter()
        self._shared(lambda r: r.set(self._key_failures, 0))

    def increment_success_counter(self) -> None:
        """Count one more successful trial call."""
        self._local.increment_success_counter()
        self._shared(lambda r: r.incr(self._key_successes))

    def reset_success_counter(self) -> None:
        """Set the count of successful trial calls to zero."""
        self._local.reset_success_counter()
        self._shared(lambda r: r.set(self._key_successes, 0))

    @property
    def counter(self) -> int:
        """Return the fleet's count of consecutive failures."""
        return self._count(self._key_failures, self._local.counter)

    @property
    def success_counter(self) -> int:
        """Return the fleet's count of successful trial calls."""
        return self._count(self._key_successes, self._local.success_counter)

    @property
    def opened_at(self) -> datetime | None:
        """Return when the breaker last opened, to the millisecond."""
        raw = self._shared(lambda r: r.get(self._key_opened_at))
        if isinstance(raw, _Unreachable):
            return self._local.opened_at
        if not isinstance(raw, bytes):
            return None

        seen, opened_at = self._opened_at
        if raw != seen:
            try:
                opened_at = datetime.fromtimestamp(float(raw), UTC)
            except (ValueError, OverflowError, OSError):
                opened_at = None
            self._opened_at = (raw, opened_at)
        return opened_at

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        """Open the breaker at ``now``, unless another process opened it later.

        pybreaker sets the open time only when it opens the breaker, and the
        state right after; here both are set in one command.
        """
        self._local.opened_at = now
        stamp = f"{now.timestamp():.3f}"
        self._shared(
            lambda _: self._open(
                keys=[self._key_opened_at, self._key_state],
                args=[stamp, pybreaker.STATE_OPEN],
            )
        )

    def claim_trial(self, limit: int, ttl: float) -> str | None:
        """Claim one of the ``limit`` trial calls of the current trip.

        Returns the claim, to hand to :meth:`release_trial` once the trial
        call's result is recorded, or None when ``limit`` trial calls are in
        flight across the fleet or the breaker is no longer half-open. A claim
        lapses after ``ttl`` seconds, so the trial call of a process that died
        does not hold the breaker half-open for ever; a trial call that takes
        longer than ``ttl`` loses its claim the same way.
        While Redis is unreachable every claim is granted, and the breaker's
        own count of trial calls applies.
        """
        claim = self._shared(
            lambda _: self._claim(
                keys=[self._key_opened_at, self._key_trials, self._key_state],
                args=[limit, max(1, int(ttl * 1000)), pybreaker.STATE_HALF_OPEN],
            )
        )
        if isinstance(claim, _Unreachable):
            return LOCAL_CLAIM
        if isinstance(claim, bytes):
            return claim.decode()
        return None

    def release_trial(self, claim: str) -> None:
        """Give back a claim from :meth:`claim_trial`: its trial call has ended."""
        if claim != LOCAL_CLAIM:
            self._shared(lambda _: self._release(keys=[claim]))

    def _count(self, key: str, local: int) -> int:
        raw = self._shared(lambda r: r.get(key))
        if isinstance(raw, _Unreachable):
            return local
        try:
            return int(raw) if isinstance(raw, bytes) else 0
        except ValueError:
            return 0

    def _seed(self, *, overwrite: bool) -> None:
        """Give Redis the local state, which it lacks or holds garbled."""
        local = self._local
        opened_at = local.opened_at

        def seed(r: redis.Redis) -> object:
            with r.pipeline() as pipe:
                pipe.set(self._key_state, local.state, nx=not overwrite)
                pipe.set(self._key_failures, local.counter, nx=True)
                pipe.set(self._key_successes, local.success_counter, nx=True)
                if opened_at is not None:
                    stamp = f"{opened_at.timestamp():.3f}"
                    pipe.set(self._key_opened_at, stamp, nx=True)
                return pipe.execute()

        self._shared(seed)

    def _shared(self, command: Callable[[redis.Redis], T]) -> T | _Unreachable:
        """Run ``command`` on Redis, unless Redis is being left alone after a failure.

        A failure starts the pause of ``retry_after`` seconds, and the first
        one of an outage is logged.
        """
        if self._down and time.monotonic() < self._retry_at:
            return _UNREACHABLE
        try:
            result = command(self._redis)
        except RedisError as error:
            self._failed(error)
            return _UNREACHABLE
        if self._down:
            self._resumed()
        return result

    def _failed(self, error: RedisError) -> None:
        with self._lock:
            self._retry_at = time.monotonic() + self.retry_after
            first = not self._down
            self._down = True
        if first:
            log.warning(
                "breaker=%s storage=redis unreachable, deciding on local state "
                "until it is back: %s",
                self.breaker_name,
                error,
            )
        for hook in self.error_hooks:
            try:
                hook(self, error)
            except Exception:
                log.exception("storage error hook failed breaker=%s", self.breaker_name)

    def _resumed(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            log.info(
                "breaker=%s storage=redis reachable again, sharing state",
                self.breaker_name,
            )
