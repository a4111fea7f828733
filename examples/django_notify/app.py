"""A minimal Django app whose view writes a row and pushes it to the user with hub.

The push is registered with ``transaction.on_commit``, so it goes out only once the row is
committed: a client told "you have a new note" can fetch it at once, and a transaction that
rolls back (here: the user is over quota) pushes nothing. Publishing straight from the view
would tell clients about rows that may never exist.

Everything is in this one file (``settings.configure``, a raw SQL table in SQLite, one URL).
Run it by hand (three terminals, from the repository root; ``pip install django``)::

    redis-server --port 6379
    hub serve --redis-url redis://127.0.0.1:6379/0
    HUB_REDIS_URL=redis://127.0.0.1:6379/0 python examples/django_notify/app.py runserver 8000

then connect a client to ``ws://127.0.0.1:8765/ws?user=alice`` (README, "Using it") and::

    curl -X POST http://127.0.0.1:8000/notes/alice -d text=hello

The client receives ``{"type":"message","channel":"user:alice","data":{"note":1,"text":"hello"}}``.
After ``NOTES_PER_USER`` notes (default 3) the view answers 429 and nothing is pushed.
The SQLite file lives in a temporary directory (``$DJANGO_NOTIFY_DIR`` to choose one).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import django
from django.conf import settings
from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse
from django.urls import re_path
from django.views.decorators.http import require_POST

from hub import Publisher

_publishers: dict[str, Publisher] = {}


class OverQuota(Exception):
    """The user already has ``settings.NOTES_PER_USER`` notes."""


def configure(db_dir: str | Path, redis_url: str, notes_per_user: int = 3) -> None:
    """Configure Django once per process (settings in code, SQLite at ``db_dir/notes.sqlite3``)
    and create the ``notes`` table. ``redis_url``: the hubs' Redis, read at every request
    from ``settings.HUB_REDIS_URL`` (so tests may override it)."""
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="example-only-not-secret",
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["127.0.0.1", "localhost", "testserver"],
            # A real project keeps its middleware (CsrfViewMiddleware among them); this
            # example's endpoint is called by curl and by tests, so it has none.
            MIDDLEWARE=[],
            INSTALLED_APPS=[],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                                   "NAME": str(Path(db_dir) / "notes.sqlite3")}},
            HUB_REDIS_URL=redis_url,
            NOTES_PER_USER=notes_per_user,
        )
        django.setup()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                       " user_id TEXT NOT NULL, text TEXT NOT NULL)")


def publisher() -> Publisher:
    """The process's :class:`hub.Publisher` for ``settings.HUB_REDIS_URL`` (made once)."""
    url = settings.HUB_REDIS_URL
    if url not in _publishers:
        _publishers[url] = Publisher(url)
    return _publishers[url]


def add_note(user_id: str, text: str) -> int:
    """Insert a note and, once the transaction commits, push it to ``user:<user_id>``.

    Returns the note's id. Raises :class:`OverQuota` (after the insert, so the transaction
    rolls back and nothing is pushed) when the user is past ``settings.NOTES_PER_USER``.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("INSERT INTO notes (user_id, text) VALUES (%s, %s)", [user_id, text])
        note_id = cursor.lastrowid
        # Only when the row is really there: a rollback discards this callback. robust:
        # a push that fails (Redis down) is logged and does not fail the committed request.
        transaction.on_commit(lambda: publisher().publish_to_user(
            user_id, {"note": note_id, "text": text}), robust=True)
        cursor.execute("SELECT COUNT(*) FROM notes WHERE user_id = %s", [user_id])
        if cursor.fetchone()[0] > settings.NOTES_PER_USER:
            raise OverQuota(user_id)
    return note_id


@require_POST
def notes(request: HttpRequest, user_id: str) -> JsonResponse:
    """``POST /notes/<user_id>`` with the form field ``text``: 201 ``{"note": id}``,
    400 for no text, 429 past the quota. The URL admits only user ids hub accepts."""
    text = request.POST.get("text", "")
    if not text:
        return JsonResponse({"error": "the form field text is required"}, status=400)
    try:
        note_id = add_note(user_id, text)
    except OverQuota:
        return JsonResponse({"error": "too many notes"}, status=429)
    return JsonResponse({"note": note_id}, status=201)


# hub's user ids: 1-123 characters of A-Z a-z 0-9 _ . : @ / - (docs/protocol.md section 2).
urlpatterns = [re_path(r"^notes/(?P<user_id>[A-Za-z0-9_.:@/-]{1,123})$", notes)]


if __name__ == "__main__":
    configure(os.environ.get("DJANGO_NOTIFY_DIR") or tempfile.mkdtemp(prefix="django-notify-"),
              os.environ.get("HUB_REDIS_URL", "redis://127.0.0.1:6379/0"))
    from django.core.management import execute_from_command_line
    execute_from_command_line(sys.argv)
