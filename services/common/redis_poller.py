"""The one loop every service uses to poll Redis: a named daemon thread that calls a function
every interval, keeps going through Redis outages and reports them the same way everywhere.

    poller = RedisPoller("plan-watch", poll, interval_s=0.5, while_down="serving on the last plan")

    def poll() -> None:
        with poller.attempt():                  # a redis.RedisError in here is reported, not raised
            found = read_plan(client, keys)
        if poller.outage:
            return                              # Redis is away: keep what we have
        ...

    poll(); poller.start()                      # first call now, then one every 0.5 s
    poller.close()                              # wakes the thread at once and joins it

A Redis error inside `attempt` while Redis was reachable logs one warning, `redis unreachable`
(loop=<name> meanwhile=<while_down>); the next attempt that gets through logs one
`redis reachable again`. Every failed attempt counts in `moe_redis_errors_total{loop}`. Anything
else a poll raises is a bug: logged with its traceback, and the loop goes on. Calls start every
`interval_s` (a poll that takes longer delays the next, it never overlaps it).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import redis
from prometheus_client import Counter

from services.common.logging import event, get_logger

log = get_logger("redis")

REDIS_ERRORS = Counter("moe_redis_errors_total", "Redis calls that failed (unreachable, timed out), per polling loop",
                       ["loop"])
CLOSE_WAIT_S = 5.0  # a poll still waiting on Redis after this is left to its daemon thread


class RedisPoller:
    """Calls `poll` every `interval_s` seconds on a daemon thread named `name` until `close`."""

    def __init__(self, name: str, poll: Callable[[], object], *, interval_s: float, while_down: str) -> None:
        """while_down: what the loop does while Redis is away, for the outage line ("keeping the
        last plan")."""
        self.name = name
        self.poll = poll
        self.interval_s = interval_s
        self.while_down = while_down
        self.outage = False  # the last attempt failed
        self._errors = REDIS_ERRORS.labels(name)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def attempt(self) -> Iterator[None]:
        """Run the block's Redis calls: a redis.RedisError ends the block and is reported (it is
        not raised); getting to the end reports Redis reachable. Read `outage` after the block."""
        try:
            yield
        except redis.RedisError as err:
            self._errors.inc()
            with self._lock:
                went_away, self.outage = not self.outage, True
            if went_away:
                event(log, "redis unreachable", level=logging.WARNING, loop=self.name, meanwhile=self.while_down,
                      error=str(err))
            return
        with self._lock:
            came_back, self.outage = self.outage, False
        if came_back:
            event(log, "redis reachable again", loop=self.name)

    def start(self, *, immediately: bool = False) -> "RedisPoller":
        """Start the thread; its first call comes after one interval, or at once with `immediately`."""
        self._thread = threading.Thread(target=self._run, args=(immediately,), name=self.name, daemon=True)
        self._thread.start()
        return self

    def _run(self, immediately: bool) -> None:
        wait_s = 0.0 if immediately else self.interval_s
        while not self._stop.wait(wait_s):
            started = time.monotonic()
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001 - the loop must outlive one bad poll
                event(log, "poll failed", level=logging.ERROR, loop=self.name, error=repr(err), exc_info=True)
            wait_s = max(0.0, self.interval_s - (time.monotonic() - started))

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Stop the loop: the thread wakes at once; a poll in progress is waited for up to `timeout_s`."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
