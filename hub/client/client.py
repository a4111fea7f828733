"""The client: one WebSocket connection at a time to one of the hub URLs, kept up.

Why the loop is ours and not websockets' reconnecting iterator (``async for websocket in
connect(...)``): that iterator retries only failed *attempts* (its ``process_exception``) and
resets its backoff as soon as a handshake succeeds, while the hub's policy depends on the
close code of a connection that was up (4001: fresh token; 4003, 4002: stop; 4029: longer
backoff), resets the backoff only after 10 s up, must authenticate in-band and resubscribe
before the connection counts as up, and fails over between URLs from one attempt to the
next (the iterator is bound to one URI). So each attempt is one ``websockets.asyncio.client
.connect(url)``, and :mod:`hub.client.policy` decides what comes next.

Tasks: the client runs one task (the connection loop) and, per connection, a reader task and
at most one refresh task; :meth:`Client.close` cancels and awaits all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from . import policy
from .errors import (
    AuthenticationFailed,
    ClientClosed,
    ClientError,
    ConnectionLost,
    ConnectionStopped,
    Unsubscribed,
    error_from_reply,
)
from .frames import (
    Ack,
    ClientInfo,
    ErrorReply,
    GapFrame,
    HistoryReply,
    Message,
    PresenceEvent,
    PresenceReply,
    PresenceStatsReply,
    ServerFrame,
    StreamPosition,
    Subscribed,
    Unknown,
    UnsubscribedFrame,
    command,
    encode,
    parse_frame,
    token_exp,
)
from .subscription import Inbox, Subscription

__all__ = ["Client", "connect"]

logger = logging.getLogger("hub.client")

#: An async callable returning a fresh token (a JWT string).
TokenGetter = Callable[[], Awaitable[str]]

#: Close codes whose connection is stopped by an authentication problem.
_AUTH_CODES = (4001, 4002)


def refresh_delay(remaining: float) -> float:
    """Seconds to wait before refreshing a token that expires in ``remaining`` seconds:
    when four fifths of its life are gone, at most 30 s before ``exp`` (0 if already due)."""
    return max(0.0, remaining - min(30.0, remaining / 5))


@dataclass
class _Pending:
    future: asyncio.Future[Any] | None
    hook: Callable[[ServerFrame], None] | None = None


class Client:
    """A hub client; make it with :func:`connect`. See docs/clients.md.

    ``url`` is a ``ws://`` or ``wss://`` URL of the hub's ``/ws``, or a sequence of them: each
    attempt after a failure or a drop uses the next one (failover between hub processes).
    ``token`` is a JWT sent in-band as the first frame (``{"op":"connect"}``), never in the
    URL; ``get_token`` an async callable returning one: called when there is no token yet,
    to ``refresh`` before the token's ``exp``, and after close 4001 (token expired). With
    neither, no ``connect`` is sent (a hub without ``--jwt-secret``).

    Timing (seconds): ``request_timeout`` bounds every request (subscribe, publish ...,
    waiting for a connection included; then TimeoutError); ``open_timeout`` one handshake;
    ``ping_interval`` websockets' keepalive (None: off); ``min_delay``/``max_delay``/
    ``reset_after`` the backoff (:class:`hub.client.policy.Backoff`). ``max_queue`` is how
    many items a subscription holds before the reader waits for the application (then the
    hub sees a slow consumer). ``connect_kwargs`` go to ``websockets.asyncio.client.connect``
    (``ssl``, ``additional_headers``, ``proxy`` (default None: no proxy) ...).

    Raises ValueError for an empty URL list or a URL that is not ws:// or wss://.
    """

    def __init__(self, url: str | Sequence[str], *, token: str | None = None,
                 get_token: TokenGetter | None = None, request_timeout: float = 10.0,
                 open_timeout: float = 10.0, ping_interval: float | None = 20.0,
                 min_delay: float = 0.25, max_delay: float = 10.0, reset_after: float = 10.0,
                 max_queue: int = 1024, **connect_kwargs: Any) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("connect() needs at least one URL")
        for u in urls:
            try:
                parse_uri(u)
            except InvalidURI as exc:
                raise ValueError(f"not a ws:// or wss:// URL: {u!r}") from exc
        self._urls = urls
        self._token = token
        self._get_token = get_token
        self._token_stale = False
        self._request_timeout = request_timeout
        self._max_queue = max_queue
        self._backoff = policy.Backoff(min_delay, max_delay, reset_after=reset_after)
        self._connect_kwargs = {"open_timeout": open_timeout, "ping_interval": ping_interval,
                                "proxy": None, **connect_kwargs}
        self._ids = itertools.count(1)
        self._subs: dict[str, Subscription] = {}
        self._server_subs: Inbox[Subscription] | None = None
        self._pending: dict[int, _Pending] = {}
        self._ws: ClientConnection | None = None
        self._connected = False
        self._closed = False
        self._stop_error: ConnectionStopped | None = None
        self._changed: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._url_index = 0
        #: The user id of the connect ack (None before it, or without in-band auth).
        self.user: str | None = None
        #: This connection's id (the ``client`` of the connect ack; None without one).
        self.client_id: str | None = None
        #: The token's ``exp`` (seconds since the epoch) as last known, None: none.
        self.exp: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __await__(self) -> Generator[Any, None, Client]:
        return self.__aenter__().__await__()

    async def start(self) -> None:
        """Start the connection loop and wait until the first connection is up (reconnecting
        with backoff as long as the policy says so). Raises :class:`ConnectionStopped` (or
        :class:`AuthenticationFailed`) when the client stops instead."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hub.client")
        await self._wait_connected(None)

    async def close(self) -> None:
        """Close the connection (code 1000) and end every task: subscriptions' iterators
        stop, pending requests raise :class:`ClientClosed`. Idempotent."""
        self._closed = True
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._shutdown(None)

    async def wait_closed(self) -> None:
        """Until the client ends: returns after :meth:`close`, raises the
        :class:`ConnectionStopped` that stopped it otherwise."""
        while True:
            if self._stop_error is not None:
                raise self._stop_error
            if self._closed:
                return
            await self._wait_change()

    @property
    def connected(self) -> bool:
        """True while a connection is up (authenticated and resubscribed)."""
        return self._connected

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The active subscriptions by channel (a copy), the server's included."""
        return dict(self._subs)

    def server_subscriptions(self) -> AsyncIterator[Subscription]:
        """The subscriptions the server makes (``subscribed`` frames), as they come: one
        iterator per client (the first call makes it). Each is then the client's own: kept
        across reconnects. Ends when the client closes (raises its stop error if it
        stopped)."""
        if self._server_subs is None:
            self._server_subs = Inbox(1 << 30)
        inbox = self._server_subs

        async def iterate() -> AsyncIterator[Subscription]:
            while True:
                try:
                    yield await inbox.get()
                except StopAsyncIteration:
                    return

        return iterate()

    # -- commands --------------------------------------------------------------------------

    async def subscribe(self, channel: str, *, last: int | None = None,
                        since: StreamPosition | None = None) -> Subscription:
        """Subscribe to ``channel`` and return once the hub acked it (messages published
        after the ack arrive). On a history channel ``last`` asks for that backlog (1-1000)
        and ``since`` for recovery from a position. Raises ValueError when already
        subscribed, the :class:`HubError` of the refusal (:class:`Forbidden`,
        :class:`NoHistory`, :class:`BadChannel` ...), TimeoutError after
        ``request_timeout``, the stop error or :class:`ClientClosed`."""
        if channel in self._subs:
            raise ValueError(f"already subscribed to {channel!r}")
        self._check_open()
        sub = Subscription(channel, last=last, since=since, max_queue=self._max_queue,
                           unsubscribe=self.unsubscribe)
        self._subs[channel] = sub
        if self._connected and self._ws is not None:
            await self._send_subscribe(self._ws, sub)
        try:
            async with asyncio.timeout(self._request_timeout):
                await sub.wait_ready()
        except BaseException:
            if self._subs.get(channel) is sub:
                del self._subs[channel]
            sub.finish(drop=True)
            raise
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """End the subscription to ``channel`` (its iterator stops) and tell the hub; no
        error when not subscribed or not connected."""
        sub = self._subs.pop(channel, None)
        if sub is not None:
            sub.finish(drop=True)
        if self._connected:
            with contextlib.suppress(ConnectionLost, TimeoutError):
                await self._request(command("unsubscribe", channel=channel))

    async def publish(self, channel: str, data: Any, *,
                      idempotency_key: str | None = None) -> StreamPosition | None:
        """Publish ``data`` (any JSON-serialisable value) to ``channel``; returns once the hub
        acked it: the publication's :class:`StreamPosition` on a history channel, else None.
        Raises TypeError/ValueError for data JSON cannot hold, :class:`Forbidden` (no
        ``--client-publish`` pattern allows it), :class:`NoHistory` (an idempotency key on
        a channel without history), :class:`ConnectionLost` (maybe published: retry with an
        ``idempotency_key``), TimeoutError ..."""
        ack = await self._request(command("publish", channel=channel, data=data,
                                          idempotency_key=idempotency_key))
        assert isinstance(ack, Ack)
        return ack.position

    async def history(self, channel: str, *, limit: int | None = None,
                      since: StreamPosition | None = None) -> HistoryReply:
        """The ``limit`` (1-1000, the hub's default 100) most recent messages of a history
        channel, or the first ``limit`` after ``since``: a :class:`HistoryReply` (``offset``,
        ``epoch``, ``messages``). Raises :class:`NoHistory`, :class:`Forbidden` ..."""
        reply = await self._request(command("history", channel=channel, limit=limit,
                                            since=since))
        assert isinstance(reply, HistoryReply)
        return reply

    async def presence(self, channel: str) -> list[ClientInfo]:
        """Every connection subscribed to a presence channel (``client``, ``user``), in no
        particular order. Raises :class:`NoPresence`, :class:`Forbidden` ..."""
        reply = await self._request(command("presence", channel=channel))
        assert isinstance(reply, PresenceReply)
        return list(reply.clients)

    async def presence_stats(self, channel: str) -> PresenceStatsReply:
        """How many connections (``clients``) and distinct users (``users``) are subscribed
        to a presence channel. Raises :class:`NoPresence`, :class:`Forbidden` ..."""
        reply = await self._request(command("presence_stats", channel=channel))
        assert isinstance(reply, PresenceStatsReply)
        return reply

    async def ping(self) -> None:
        """An application-level round trip (``ping`` -> ``pong``)."""
        await self._request(command("ping"))

    # -- requests --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._stop_error is not None:
            raise self._stop_error
        if self._closed:
            raise ClientClosed("the client is closed")

    async def _wait_change(self) -> None:
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    async def _wait_connected(self, timeout: float | None) -> ClientConnection:
        async with asyncio.timeout(timeout):
            while True:
                self._check_open()
                if self._connected and self._ws is not None:
                    return self._ws
                await self._wait_change()

    async def _request(self, frame: dict[str, Any], *, ws: ClientConnection | None = None,
                       hook: Callable[[ServerFrame], None] | None = None) -> ServerFrame:
        """Send ``frame`` with a new id on ``ws`` (default: the connection once it is up)
        and return the reply; an error reply raises its :class:`HubError`."""
        encode(frame)  # TypeError/ValueError for data JSON cannot hold, before anything
        async with asyncio.timeout(self._request_timeout):
            if ws is None:
                ws = await self._wait_connected(None)
            cid = next(self._ids)
            future: asyncio.Future[ServerFrame] = asyncio.get_running_loop().create_future()
            self._pending[cid] = _Pending(future, hook)
            try:
                try:
                    await ws.send(encode({**frame, "id": cid}))
                except ConnectionClosed:
                    raise ConnectionLost("the connection closed before the reply") from None
                return await future
            finally:
                self._pending.pop(cid, None)

    async def _send_subscribe(self, ws: ClientConnection, sub: Subscription) -> None:
        """Send the (re)subscribe of ``sub``; its ack or error is applied by the reader."""
        fields = sub.subscribe_fields()
        since = fields["since"]
        assert since is None or isinstance(since, StreamPosition)

        def hook(frame: ServerFrame) -> None:
            if self._subs.get(sub.channel) is not sub:
                return  # unsubscribed meanwhile
            if isinstance(frame, ErrorReply):
                error = error_from_reply(frame.code, frame.message, frame.id)
                del self._subs[sub.channel]
                if sub.acked:  # a resubscribe refused after a reconnect
                    sub.finish(Unsubscribed(sub.channel, frame.code, error))
                else:
                    sub.fail(error)
            elif isinstance(frame, Ack):
                gap = sub.on_ack(frame, since)
                if gap is not None:
                    sub.deliver_now(gap)

        cid = next(self._ids)
        self._pending[cid] = _Pending(None, hook)
        with contextlib.suppress(ConnectionClosed):  # the reconnect will resubscribe
            await ws.send(encode(command("subscribe", cid, channel=sub.channel, **fields)))

    # -- the connection loop ---------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                action, error = await self._attempt(self._urls[self._url_index])
                if action is policy.Action.REFRESH_TOKEN:
                    if self._get_token is None:
                        action = policy.Action.STOP
                    else:
                        self._token_stale = True
                        action = policy.Action.RECONNECT
                if action is policy.Action.STOP:
                    assert error is not None
                    logger.warning("hub client stopped: %s", error)
                    self._shutdown(error)
                    return
                self._url_index = (self._url_index + 1) % len(self._urls)
                delay = self._backoff.next_delay(slow=action is policy.Action.RECONNECT_SLOW)
                logger.info("hub client: reconnecting in %.2f s (%s)", delay, error)
                await asyncio.sleep(delay)
        except Exception as exc:  # a bug: never leave start() or requests waiting
            logger.exception("hub client: the connection loop failed")
            self._shutdown(ConnectionStopped(f"internal error: {exc!r}"))
        finally:
            self._connected = False
            self._notify()

    async def _token_for_connect(self) -> str | None:
        if self._get_token is not None and (
                self._token is None or self._token_stale
                or (self.exp is not None and self.exp - time.time() < 1.0)):
            self._token = await self._get_token()
            self._token_stale = False
            self.exp = token_exp(self._token)
        return self._token

    async def _attempt(self, url: str) -> tuple[policy.Action, ConnectionStopped | None]:
        """One connection, from the handshake to its close: the policy's action, and the
        error to stop with (or to log)."""
        try:
            token = await self._token_for_connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the application's token endpoint failed: try again
            logger.warning("hub client: get_token failed: %r", exc)
            return policy.Action.RECONNECT, ConnectionStopped(f"get_token failed: {exc!r}")
        try:
            ws = await ws_connect(url, **self._connect_kwargs)
        except InvalidStatus as exc:
            status = exc.response.status_code
            cls = AuthenticationFailed if status in (401, 403) else ConnectionStopped
            return policy.for_status(status), cls(f"handshake refused by {url}", status=status)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return policy.Action.RECONNECT, ConnectionStopped(f"cannot connect to {url}: "
                                                              f"{exc!r}")
        up_since: float | None = None
        reader = asyncio.create_task(self._read(ws), name="hub.client.reader")
        refresher: asyncio.Task[None] | None = None
        try:
            if token is not None:
                ack = await self._request(command("connect", token=token), ws=ws)
                assert isinstance(ack, Ack)
                self.user, self.client_id = ack.user, ack.client
                self.exp = ack.exp if ack.exp is not None else token_exp(token)
                if self.exp is not None and self._get_token is not None:
                    refresher = asyncio.create_task(self._refresh(ws),
                                                    name="hub.client.refresh")
            sent: set[int] = set()  # subscribe() may add some while these are sent
            while todo := [s for s in self._subs.values() if id(s) not in sent]:
                for sub in todo:
                    sent.add(id(sub))
                    await self._send_subscribe(ws, sub)
            self._ws, self._connected = ws, True
            up_since = time.monotonic()
            self._notify()
            logger.info("hub client: connected to %s", url)
            await reader
        except (ConnectionLost, TimeoutError, ConnectionClosed):
            pass  # the close code below says what happened
        except ClientError as exc:  # an error reply to connect (bad_request: auth is off)
            await ws.close()
            return policy.Action.STOP, ConnectionStopped(f"connect refused: {exc}")
        finally:
            self._connected = False
            self._notify()
            for task in (refresher, reader):
                if task is not None and not task.done():
                    task.cancel()
            await ws.close()
            for task in (refresher, reader):
                if task is not None:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            self._fail_pending(ConnectionLost("the connection closed before the reply"))
            if self._ws is ws:
                self._ws = None
            if up_since is not None:
                self._backoff.connected_for(time.monotonic() - up_since)
        code, reason = ws.close_code, ws.close_reason or ""
        action = policy.for_close_code(code)
        cls = AuthenticationFailed if code in _AUTH_CODES else ConnectionStopped
        return action, cls(reason or "connection closed", close_code=code)

    async def _refresh(self, ws: ClientConnection) -> None:
        """Refresh the token before its ``exp`` with ``get_token``, for the life of ``ws``."""
        assert self._get_token is not None
        while self.exp is not None:
            await asyncio.sleep(refresh_delay(self.exp - time.time()))
            try:
                token = await self._get_token()
                await self._request(command("refresh", token=token), ws=ws)
            except (ConnectionLost, ConnectionClosed):
                return
            except Exception as exc:  # refused or no token: the hub closes 4001 at exp
                logger.warning("hub client: token refresh failed: %r", exc)
                return
            self._token = token
            self.exp = token_exp(token)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for text in ws:
                try:
                    frame = parse_frame(text)
                except ValueError as exc:
                    logger.warning("hub client: %s", exc)
                    continue
                await self._dispatch(frame)
        except ConnectionClosed:
            pass
        finally:
            self._fail_pending(ConnectionLost("the connection closed before the reply"))

    async def _dispatch(self, frame: ServerFrame) -> None:
        if isinstance(frame, Message | PresenceEvent):
            sub = self._subs.get(frame.channel)
            if sub is None:
                return  # not subscribed (the personal channel without a subscribe)
            if isinstance(frame, PresenceEvent) or sub.accept(frame):
                await sub.deliver(frame)
        elif isinstance(frame, GapFrame):
            for channel in frame.channels:
                if (sub := self._subs.get(channel)) is not None:
                    await sub.deliver(sub.on_gap(frame))
        elif isinstance(frame, Subscribed):
            if frame.channel not in self._subs:
                sub = Subscription(frame.channel, server=True, max_queue=self._max_queue,
                                   unsubscribe=self.unsubscribe)
                sub.on_subscribed(frame.offset, frame.epoch)
                self._subs[frame.channel] = sub
                if self._server_subs is None:
                    self._server_subs = Inbox(1 << 30)
                self._server_subs.put_now(sub)
        elif isinstance(frame, UnsubscribedFrame):
            if (sub := self._subs.pop(frame.channel, None)) is not None:
                sub.finish(Unsubscribed(frame.channel, frame.reason))
        elif isinstance(frame, Unknown):
            logger.debug("hub client: ignoring a frame of type %r", frame.type)
        elif isinstance(frame.id, int) and (pending := self._pending.pop(frame.id, None)):
            if pending.hook is not None:
                pending.hook(frame)
            if pending.future is not None and not pending.future.done():
                if isinstance(frame, ErrorReply):
                    pending.future.set_exception(
                        error_from_reply(frame.code, frame.message, frame.id))
                else:
                    pending.future.set_result(frame)
        elif isinstance(frame, ErrorReply):
            logger.warning("hub client: error %s: %s", frame.code, frame.message)

    def _fail_pending(self, error: ClientError) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(error)

    def _shutdown(self, error: ConnectionStopped | None) -> None:
        """The client ends: closed (``error`` None) or stopped by ``error``."""
        if error is not None and self._stop_error is None and not self._closed:
            self._stop_error = error
        self._fail_pending(error or ClientClosed("the client is closed"))
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            sub.finish(error)
        if self._server_subs is not None:
            self._server_subs.end(error)
        self._notify()


def connect(url: str | Sequence[str], *, token: str | None = None,
            get_token: TokenGetter | None = None, **options: Any) -> Client:
    """A :class:`Client` for ``url`` (one URL or a list to fail over between); use it as
    ``async with connect(...) as client:`` (or ``client = await connect(...)`` and
    ``await client.close()``). Entering waits for the first connection; ``options`` are
    :class:`Client`'s. Raises ValueError for a bad URL."""
    return Client(url, token=token, get_token=get_token, **options)
