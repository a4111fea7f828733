"""Presence channels of one process: joins and leaves of the local connections, the refresh of
their entries, the sweep of dead processes' entries, and the join/leave events.

A channel keeps presence when its namespace says so (:class:`hub.channels.NamespaceOptions`
``presence``); the store (:mod:`hub.presence`, docs/presence-format.md) holds one entry per
subscribed connection across every process, keyed by the connection id (``str(conn.id)``, the
``client`` of the connect ack). This module is the node's half of the contract of that
document ("How the node should use it"):

* **join**: after a subscribe to a presence channel is live, ``add`` the entry; when the
  store says it was absent and the namespace has ``join_leave``, publish a join event (after
  ``add`` returned, so every process already sees the entry). The subscribe waits for the
  ``add`` (the connection is listed once its subscribe is acknowledged) but not for the
  event;
* **leave**: on unsubscribe or disconnect, ``remove`` the entry and publish a leave event only
  when ``remove`` returned True (a sweep may have reported it already: once only);
* **refresh**: one task every ``presence_ttl / 3`` seconds (the smallest of the namespaces)
  ``refresh``-es every entry of the process; the entries the store created again (a sweep took
  them while the process stalled, or Redis lost them) are announced as joins again;
* **sweep**: one task every :data:`SWEEP_INTERVAL` seconds (jittered by
  :data:`SWEEP_JITTER`) deletes the expired entries of every shard (those of dead processes)
  and announces each as a leave: the store returns each entry to one caller only;
* **stop** (ordered shutdown): ``remove`` every entry and announce the leaves, before the
  connections close.

The operations on one connection's entry in one channel run one after the other (a chain of
tasks per ``(channel, client)``), so a leave never overtakes the join it undoes. A Redis error
never fails a subscribe or an unsubscribe: it is logged; the refresh repairs a failed ``add``
and the sweep reports the entry of a failed ``remove`` within ``presence_ttl`` plus a sweep.

Events travel through the broker on the channel's reserved presence channel
(``{<prefix><channel>}:j``, :meth:`hub.brokers.base.Broker.publish_presence`), never on the
channel itself: a backend's ``PUBLISH <prefix><channel>`` is always a message. The event is
``{"event":"join"|"leave","client":"<id>","user":"<id>"|null}``; each process turns it into
the ``join``/``leave`` frame of its local subscribers (:func:`event_frame`).

Metrics (docs/reliability.md, "Observability"): ``hub_presence_events_total{event}`` (events
this process published), ``hub_presence_sweeps_total`` and ``hub_presence_swept_total`` (its
sweeps and the entries they deleted), ``hub_presence_recreated_total`` (entries a refresh
created again) and ``hub_presence_failures_total{op}`` (the failures logged above).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import orjson

from .brokers.base import Broker, Publication
from .channels import ChannelRules
from .connection import HubConnection
from .metrics import Metrics
from .presence.base import ClientInfo, Presence, PresenceStats
from .presence.sharded import ShardedPresence
from .protocol import join_leave_frame
from .registry import Registry

__all__ = ["SWEEP_INTERVAL", "SWEEP_JITTER", "Presences", "event_frame", "event_payload"]

logger = logging.getLogger("hub.presence")

#: Seconds between two sweeps of one process (on average), and the jitter: each wait is
#: ``SWEEP_INTERVAL * (1 +- SWEEP_JITTER)``, so that processes do not sweep in lockstep.
SWEEP_INTERVAL = 5.0
SWEEP_JITTER = 0.2
#: Seconds an ordered shutdown waits for the removal of the process's entries.
STOP_TIMEOUT = 5.0

_Key = tuple[str, str]  # (channel, client id)


def event_payload(kind: str, info: ClientInfo) -> bytes:
    """The broker payload of a join or leave event (docs/protocol.md section 6)."""
    return orjson.dumps({"event": kind, "client": info.client, "user": info.user})


def event_frame(publication: Publication) -> bytes | None:
    """The ``join``/``leave`` frame of a presence event publication, or None when its payload
    is not an event (logged at debug level by the caller)."""
    try:
        event = orjson.loads(publication.payload)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    kind, client, user = event.get("event"), event.get("client"), event.get("user")
    if (kind not in ("join", "leave") or not isinstance(client, str)
            or not (user is None or isinstance(user, str))):
        return None
    return join_leave_frame(kind, publication.channel, client, user)


class Presences:
    """The presence channels of one process (see the module docstring).

    ``store`` is the presence store (a :class:`~hub.presence.sharded.ShardedPresence` is
    refreshed and swept shard by shard); ``rules`` gives each channel's options; ``registry``
    the local subscriptions; ``broker`` carries the events; ``spawn`` runs a background task;
    ``metrics`` counts the events, sweeps and failures (None: a private registry nobody
    scrapes). Call :meth:`start` once the loop runs and :meth:`stop` at the ordered shutdown.
    """

    def __init__(self, store: Presence, rules: ChannelRules, registry: Registry[HubConnection],
                 broker: Broker, spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
                 *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.shards: tuple[Presence, ...] = (store.stores if isinstance(store, ShardedPresence)
                                             else (store,))
        self.rules = rules
        self.registry = registry
        self.broker = broker
        self._spawn = spawn
        #: The entries of this process: channel -> client id -> info.
        self.entries: dict[str, dict[str, ClientInfo]] = {}
        self._ops: dict[_Key, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self.stopping = False
        ttls = [o.presence_ttl for o in (rules.defaults, *rules.namespaces.values())
                if o.presence]
        #: Seconds between two refreshes: a third of the smallest presence_ttl.
        self.refresh_interval = min(ttls, default=60.0) / 3
        self.metrics = metrics or Metrics()
        m = self.metrics
        self._events = {kind: m.presence_events.labels(kind) for kind in ("join", "leave")}
        self._failures = {op: m.presence_failures.labels(op)
                          for op in ("add", "remove", "refresh", "sweep", "publish")}

    def keeps_presence(self, channel: str) -> bool:
        """True when ``channel``'s namespace keeps presence."""
        return self.rules.keeps_presence(channel)

    def shard(self, channel: str) -> Presence:
        """The store of ``channel``'s shard."""
        store = self.store
        return store.store(channel) if isinstance(store, ShardedPresence) else store

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the refresh and the sweep tasks (and load the Redis functions)."""
        for shard in self.shards:
            ensure = getattr(shard, "ensure_functions", None)
            if ensure is not None:
                self._spawn(self._ensure(ensure))
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._refresh_loop(), name="presence-refresh"),
                       loop.create_task(self._sweep_loop(), name="presence-sweep")]

    @staticmethod
    async def _ensure(ensure: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        try:
            await ensure()
        except Exception as exc:  # loaded again on first use
            logger.warning("presence: loading the Redis functions failed: %s", exc)

    async def stop(self) -> None:
        """The ordered shutdown: stop refreshing and sweeping, let the joins and leaves under
        way finish, then remove every entry of the process and announce the leaves (at most
        :data:`STOP_TIMEOUT` seconds). Later joins do nothing. Never raises."""
        self.stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                if self._ops:
                    await asyncio.gather(*list(self._ops.values()), return_exceptions=True)
                entries = [(c, info) for c, infos in self.entries.items()
                           for info in infos.values()]
                self.entries.clear()
                await asyncio.gather(*(self._remove(c, info) for c, info in entries),
                                     return_exceptions=True)
        except TimeoutError:
            logger.warning("presence: the removal of this process's entries did not finish "
                           "within %g s; the sweep of another process reports the rest",
                           STOP_TIMEOUT)

    async def close(self) -> None:
        """Close the store (after :meth:`stop` and the broker)."""
        with contextlib.suppress(Exception):
            await self.store.close()

    # -- joins and leaves ------------------------------------------------------------------

    def _chain(self, key: _Key, make: Callable[[asyncio.Task[None] | None],
                                               Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Run ``make(previous task of key)`` as the next operation of ``key``."""
        previous = self._ops.get(key)
        task = self._spawn(make(previous))
        self._ops[key] = task

        def done(_: asyncio.Task[None]) -> None:
            if self._ops.get(key) is task:
                del self._ops[key]

        task.add_done_callback(done)
        return task

    async def join(self, conn: HubConnection, channel: str) -> None:
        """``conn``'s subscribe to the presence channel ``channel`` is live: add its entry
        (waited for) and announce the join (in the background). Never raises for Redis."""
        if self.stopping:
            return
        info = ClientInfo(str(conn.id), conn.user)
        task = self._chain((channel, info.client),
                           lambda previous: self._join(previous, conn, channel, info))
        with contextlib.suppress(Exception):
            await asyncio.shield(task)

    async def _join(self, previous: asyncio.Task[None] | None, conn: HubConnection,
                    channel: str, info: ClientInfo) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        if self.stopping or channel not in self.registry.channels_of.get(conn, ()):
            return  # left before its join ran: nothing to add
        options = self.rules.options(channel)
        created = False
        try:
            created = await self.shard(channel).add(channel, info, ttl=options.presence_ttl)
        except Exception as exc:  # the refresh adds it (and announces it) later
            self._failures["add"].inc()
            logger.warning("presence add %r failed (the refresh repairs it): %s", channel, exc)
        self.entries.setdefault(channel, {})[info.client] = info
        if created and options.join_leave:
            self._spawn(self._announce("join", channel, info))

    def leave(self, conn: HubConnection, channel: str) -> None:
        """``conn`` left the presence channel ``channel`` (unsubscribe, disconnect): remove
        its entry and announce the leave, in the background, after its join."""
        client = str(conn.id)
        self._chain((channel, client), lambda previous: self._leave(previous, channel, client))

    async def _leave(self, previous: asyncio.Task[None] | None, channel: str,
                     client: str) -> None:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
        infos = self.entries.get(channel)
        info = infos.pop(client, None) if infos is not None else None
        if infos is not None and not infos:
            del self.entries[channel]
        if info is not None:
            await self._remove(channel, info)

    async def _remove(self, channel: str, info: ClientInfo) -> None:
        try:
            removed = await self.shard(channel).remove(channel, info.client)
        except Exception as exc:  # the sweep reports it within presence_ttl + a sweep
            self._failures["remove"].inc()
            logger.warning("presence remove %r failed (the sweep reports it): %s", channel,
                           exc)
            return
        if removed and self.rules.join_leave(channel):
            await self._announce("leave", channel, info)

    async def _announce(self, kind: str, channel: str, info: ClientInfo) -> None:
        """Publish a join or leave event of ``channel`` through the broker."""
        try:
            await self.broker.publish_presence(channel, event_payload(kind, info))
        except Exception as exc:
            self._failures["publish"].inc()
            logger.warning("presence: the %s of %r could not be published: %s", kind,
                           channel, exc)
            return
        self._events[kind].inc()

    # -- reads -----------------------------------------------------------------------------

    async def clients(self, channel: str) -> list[ClientInfo]:
        """The live entries of ``channel`` (raises what the store raises)."""
        return await self.shard(channel).clients(channel)

    async def stats(self, channel: str) -> PresenceStats:
        """Live connections and distinct users of ``channel`` (raises what the store
        raises)."""
        return await self.shard(channel).stats(channel)

    # -- refresh and sweep -----------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Refresh every entry of the process, shard by shard and ttl by ttl; announce the
        entries the store created again as joins (those that left meanwhile are removed
        again, silently: their leave was announced). Never raises."""
        groups: dict[tuple[int, float], list[tuple[str, ClientInfo]]] = {}
        for channel, infos in self.entries.items():
            ttl = self.rules.options(channel).presence_ttl
            shard = self.shards.index(self.shard(channel)) if len(self.shards) > 1 else 0
            groups.setdefault((shard, ttl), []).extend((channel, i) for i in infos.values())
        for (shard, ttl), entries in groups.items():
            try:
                created = await self.shards[shard].refresh(entries, ttl=ttl)
            except Exception as exc:
                self._failures["refresh"].inc()
                logger.warning("presence refresh of %d entries failed: %s", len(entries), exc)
                continue
            self._created(created)

    def _created(self, created: Iterable[tuple[str, ClientInfo]]) -> None:
        for channel, info in created:
            if self.entries.get(channel, {}).get(info.client) == info:
                self.metrics.presence_recreated.inc()
                if self.rules.join_leave(channel):
                    self._spawn(self._announce("join", channel, info))
            else:  # left while the refresh ran: the refresh brought it back
                self._spawn(self._quiet_remove(channel, info.client))

    async def _quiet_remove(self, channel: str, client: str) -> None:
        with contextlib.suppress(Exception):
            await self.shard(channel).remove(channel, client)

    async def _sweep_loop(self) -> None:
        while True:
            jitter = 1 + SWEEP_JITTER * (2 * random.random() - 1)
            await asyncio.sleep(SWEEP_INTERVAL * jitter)
            await self.sweep()

    async def sweep(self) -> int:
        """Sweep every shard once; announce each entry the sweep deleted as a leave. Returns
        the number of entries swept. Never raises."""
        swept = 0
        for shard in self.shards:
            self.metrics.presence_sweeps.inc()
            try:
                gone = await shard.sweep()
            except Exception as exc:
                self._failures["sweep"].inc()
                logger.warning("presence sweep failed: %s", exc)
                continue
            for channel, infos in gone.items():
                swept += len(infos)
                self.metrics.presence_swept.inc(len(infos))
                if self.rules.join_leave(channel):
                    await asyncio.gather(*(self._announce("leave", channel, info)
                                           for info in infos))
        if swept:
            logger.info("presence sweep: %d expired entries removed", swept)
        return swept
