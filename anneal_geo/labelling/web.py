"""The web labeller: ``anneal-geo label SESSION --web``, a local page over a small JSON API.

A Starlette app served by uvicorn, bound to 127.0.0.1 by default. The page (``static/``:
index.html, labeller.js, app.js, app.css) is plain JavaScript served from the package:
nothing is loaded from another machine. The API:

========================================  ==================================================
``POST /api/hello``                       a new client token (this page may answer) + state
``GET  /api/state?token=``                the state; ``active`` says whether that token may
                                          answer
``POST /api/answer``                      ``{token, pair, value}``: commit, then the state
``POST /api/undo``                        ``{token, pair}``: undo that pair's answer
``POST /api/train``                       ``{token}``: train a round that waits (no auto-train)
``GET  /api/patch/{id}.png?bands=``       a patch, native resolution, pool-wide stretch
``GET  /api/locator/{i}/{j}.jpg``         both patches on their scene (tile pools)
``GET  /api/neighbours/{id}?k=``          nearest patches in the current embedding
========================================  ==================================================

Who may answer: the newest page load. Each load gets a token from ``/api/hello`` and
becomes the answering client; an older tab's answers are refused (HTTP 409 with
``elsewhere``) and the page says that the session is open elsewhere and offers to take it
back. Every answer also names the pair it answers, and the controller refuses an answer for
a pair that is not the current one (a repeated answer that is already stored is
acknowledged without writing), so neither a second tab nor a retried request stores an
answer twice.

Threads: the engine and its SQLite connection live on one worker thread; every call that
reads or writes the session runs there, in order. Training a finished round runs there
too, while the page polls a state kept aside (phase ``training``), so the server stays
responsive; pictures are rendered on Starlette's thread pool from the pool's arrays only.

The server never takes the session's lock itself: the engine it builds does (a second
server on the same session fails to start with the lock's message), and it is closed, the
lock released, when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
import time
import traceback
import webbrowser
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from anneal_geo.errors import AnnealError, ConfigError

if TYPE_CHECKING:
    from anneal_geo.labelling.controller import LabellingController

__all__ = ["DEFAULT_PORT", "STATIC", "LabellingServer", "RunningServer", "bind", "serve"]

#: The folder of the page's files (shipped inside the package).
STATIC = Path(__file__).resolve().parent / "static"
#: The first port tried when none is given; the next ones are tried when it is taken.
DEFAULT_PORT = 8765
_PORT_TRIES = 20
#: The command shown to a second writer of the session.
COMMAND = "anneal-geo label --web"

T = TypeVar("T")


@dataclass
class _Training:
    round: int
    started: float
    estimate: float | None
    labelled: int
    base: dict[str, Any] = field(default_factory=dict)


class LabellingServer:
    """The labeller's state on the server: one controller on one worker thread.

    Args:
        build: makes the controller (and its engine); called on the worker thread, so the
            engine's SQLite connection belongs to that thread.
        auto_train: train a round as soon as its last pair is answered (the page shows
            the progress and continues by itself); with False the page offers "Train and
            continue" and the last answer can still be undone.
    """

    def __init__(
        self, build: Callable[[], LabellingController], *, auto_train: bool = True
    ) -> None:
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anneal-engine")
        self.auto_train = auto_train
        self._owner: str | None = None
        self._guard = threading.Lock()
        self._training: _Training | None = None
        self._train_error = ""
        self._closed = False
        try:
            self.controller: LabellingController = self._worker.submit(build).result()
        except BaseException:
            self._worker.shutdown(wait=True)
            raise

    @classmethod
    def open(
        cls,
        session_dir: str | Path,
        *,
        bands: str | Sequence[str] | None = None,
        annotator: str = "web",
        auto_train: bool = True,
        command: str = COMMAND,
    ) -> LabellingServer:
        """A server on a session directory: opens its pool and builds its engine."""

        def build() -> LabellingController:
            from anneal_geo.data.pool import PatchPool
            from anneal_geo.engine import Engine
            from anneal_geo.labelling.controller import LabellingController
            from anneal_geo.session import Session

            session = Session.open(session_dir)
            pool = PatchPool.open(session.pool_dir)
            engine = Engine(session, pool, progress=False, command=command)
            try:
                return LabellingController(engine, annotator, bands=bands)
            except BaseException:
                engine.close()
                raise

        return cls(build, auto_train=auto_train)

    # -- the worker thread -------------------------------------------------------------
    def run(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on the engine's thread (in order with every other call)."""
        return self._worker.submit(fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.run(fn, *args))

    def close(self) -> None:
        """Close the engine (releasing the session's lock) and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self.controller.engine.close).result()
        finally:
            self._worker.shutdown(wait=True)

    # -- state -------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        """The controller's state, or the training state while a round trains."""
        with self._guard:
            training = self._training
            error = self._train_error
        if training is not None:
            return self._training_state(training)
        state = self.controller.state()
        if error:
            state["error"] = error
        return state

    @staticmethod
    def _training_state(training: _Training) -> dict[str, Any]:
        from anneal_geo.labelling.controller import training_state

        elapsed = time.monotonic() - training.started
        return training_state(
            training.base, training.round, elapsed, training.estimate, training.labelled
        )

    def _start_training(self, base: dict[str, Any]) -> None:
        """Queue the round's training on the worker (called on the worker)."""
        controller = self.controller
        labelled = int(controller.progress().budget_used)
        with self._guard:
            self._train_error = ""
            self._training = _Training(
                round=controller.engine.rounds_done,
                started=time.monotonic(),
                estimate=controller.training_estimate(),
                labelled=labelled,
                base=base,
            )
        self.run(self._train)

    def _train(self) -> None:
        try:
            self.controller.finish_round()
        except AnnealError as exc:
            with self._guard:
                self._train_error = f"training failed: {exc}"
        except Exception as exc:
            traceback.print_exc()
            with self._guard:
                self._train_error = f"training failed: {type(exc).__name__}: {exc}"
        finally:
            with self._guard:
                self._training = None

    @property
    def training(self) -> bool:
        """Whether a round is training now."""
        with self._guard:
            return self._training is not None

    # -- actions (on the worker) -------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        """A new client token; the newest page load is the one that may answer."""
        token = secrets.token_hex(8)
        with self._guard:
            self._owner = token
        return {"ok": True, "token": token, "state": self._state()}

    def is_owner(self, token: str | None) -> bool:
        with self._guard:
            return token is not None and token == self._owner

    def _refused(self) -> dict[str, Any]:
        return {
            "ok": False,
            "elsewhere": True,
            "error": "this session is being labelled in another tab or window; answers from "
            "this page are refused (take it back with 'Label in this tab instead')",
            "state": self._state(),
        }

    def answer(self, token: str | None, value: Any, pair: Any) -> tuple[int, dict[str, Any]]:
        """Commit an answer from the client ``token`` for the pair it shows."""
        from anneal_geo.labelling.controller import LabellingConflict

        if not self.is_owner(token):
            return 409, self._refused()
        if self.training:
            return 409, {"ok": False, "error": "the round is training", "state": self._state()}
        try:
            done = self.controller.answer(value, pair=pair)
        except LabellingConflict as exc:
            return 409, {"ok": False, "conflict": True, "error": str(exc), "state": self._state()}
        state = self.controller.state()
        if state["phase"] == "round_complete" and self.auto_train:
            self._start_training(state)
            state = self._state()
        reply = {
            "ok": True,
            "seq": done.seq,
            "repeated": done.repeated,
            "saved": [done.i, done.j, done.value],
            "state": state,
        }
        return 200, reply

    def undo(self, token: str | None, pair: Any) -> tuple[int, dict[str, Any]]:
        """Undo the latest answer of the round (the one about ``pair``)."""
        from anneal_geo.labelling.controller import LabellingConflict

        if not self.is_owner(token):
            return 409, self._refused()
        if self.training:
            return 409, {"ok": False, "error": "the round is training", "state": self._state()}
        try:
            undone = self.controller.undo(pair=pair)
        except LabellingConflict as exc:
            return 409, {"ok": False, "conflict": True, "error": str(exc), "state": self._state()}
        return 200, {
            "ok": True,
            "undone": None if undone is None else list(undone),
            "state": self._state(),
        }

    def train(self, token: str | None) -> tuple[int, dict[str, Any]]:
        """Train a round whose pairs are all answered (when it waits for the person)."""
        if not self.is_owner(token):
            return 409, self._refused()
        if self.training:
            return 200, {"ok": True, "state": self._state()}
        state = self.controller.state()
        if state["phase"] != "round_complete":
            return 409, {
                "ok": False,
                "error": "the round still has pairs to answer",
                "state": state,
            }
        self._start_training(state)
        return 200, {"ok": True, "state": self._state()}

    # -- the app -----------------------------------------------------------------------
    def app(self, allowed_hosts: Sequence[str] | None = None) -> Any:
        """The Starlette app (``allowed_hosts``: Host headers accepted, None = any)."""
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import Request
        from starlette.responses import FileResponse, JSONResponse, Response
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        def json(status: int, body: dict[str, Any]) -> Response:
            return JSONResponse(body, status_code=status, headers={"cache-control": "no-store"})

        async def payload(request: Request) -> dict[str, Any]:
            try:
                body = await request.json()
            except ValueError:
                body = None
            if not isinstance(body, dict):
                raise ConfigError("the request body must be a JSON object")
            return body

        def guarded(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
            async def run(request: Request) -> Response:
                try:
                    response: Response = await handler(request)
                    return response
                except AnnealError as exc:
                    return json(400, {"ok": False, "error": str(exc)})

            return run

        async def index(request: Request) -> Response:
            return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

        async def hello(request: Request) -> Response:
            return json(200, await self._call(self.hello))

        async def state(request: Request) -> Response:
            token = request.query_params.get("token")
            body = await self._call(self._state)
            return json(200, {"ok": True, "active": self.is_owner(token), "state": body})

        async def answer(request: Request) -> Response:
            body = await payload(request)
            status, reply = await self._call(
                self.answer, body.get("token"), body.get("value"), body.get("pair")
            )
            return json(status, reply)

        async def undo(request: Request) -> Response:
            body = await payload(request)
            status, reply = await self._call(self.undo, body.get("token"), body.get("pair"))
            return json(status, reply)

        async def train(request: Request) -> Response:
            body = await payload(request)
            status, reply = await self._call(self.train, body.get("token"))
            return json(status, reply)

        def patch_number(request: Request, name: str) -> int:
            try:
                return int(request.path_params[name])
            except (KeyError, ValueError):
                raise ConfigError(f"'{request.path_params.get(name)}' is not a patch id") from None

        async def patch(request: Request) -> Response:
            from starlette.concurrency import run_in_threadpool

            patch_id = patch_number(request, "patch_id")
            bands = request.query_params.get("bands") or None
            if not 0 <= patch_id < len(self.controller.engine.pool):
                return json(404, {"ok": False, "error": f"no patch {patch_id} in this pool"})
            data = await run_in_threadpool(self.controller.patch_png, patch_id, bands)
            return Response(
                data, media_type="image/png", headers={"cache-control": "max-age=86400"}
            )

        async def locator(request: Request) -> Response:
            from starlette.concurrency import run_in_threadpool

            i, j = patch_number(request, "i"), patch_number(request, "j")
            n = len(self.controller.engine.pool)
            if not (0 <= i < n and 0 <= j < n):
                return json(404, {"ok": False, "error": "no such patch"})
            data = await run_in_threadpool(self.controller.locator_jpeg, i, j)
            if data is None:
                return json(404, {"ok": False, "error": "this pool has no scene pictures"})
            return Response(
                data, media_type="image/jpeg", headers={"cache-control": "max-age=86400"}
            )

        async def neighbours(request: Request) -> Response:
            from starlette.concurrency import run_in_threadpool

            patch_id = patch_number(request, "patch_id")
            try:
                k = int(request.query_params.get("k", "4"))
            except ValueError:
                raise ConfigError("k must be a whole number") from None
            ids = await run_in_threadpool(self.controller.neighbours, patch_id, k)
            return json(200, {"ok": True, "ids": ids})

        routes = [
            Route("/", guarded(index)),
            Route("/api/hello", guarded(hello), methods=["POST"]),
            Route("/api/state", guarded(state)),
            Route("/api/answer", guarded(answer), methods=["POST"]),
            Route("/api/undo", guarded(undo), methods=["POST"]),
            Route("/api/train", guarded(train), methods=["POST"]),
            Route("/api/patch/{patch_id}.png", guarded(patch)),
            Route("/api/locator/{i}/{j}.jpg", guarded(locator)),
            Route("/api/neighbours/{patch_id}", guarded(neighbours)),
            Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
        ]
        middleware = (
            [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))]
            if allowed_hosts
            else []
        )
        return Starlette(routes=routes, middleware=middleware)


# -- serving ---------------------------------------------------------------------------------


def bind(host: str, port: int | None) -> socket.socket:
    """A listening socket on ``host``: ``port``, or the first free one from 8765 when None.

    Raises:
        ConfigError: the port is taken (or no port near 8765 is free).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = (
        [port] if port is not None else list(range(DEFAULT_PORT, DEFAULT_PORT + _PORT_TRIES))
    )
    last: OSError | None = None
    for candidate in candidates:
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
        # without it every response waits ~40 ms for a delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.listen(128)
        sock.setblocking(False)
        return sock
    if port is not None:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({last.strerror if last else 'in use'}); pick "
            "another with --port N (0 = any free port)"
        )
    raise ConfigError(
        f"no free port on {host} between {DEFAULT_PORT} and {DEFAULT_PORT + _PORT_TRIES - 1}; "
        "pick one with --port N (0 = any free port)"
    )


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _allowed_hosts(host: str) -> list[str] | None:
    """Host headers to accept: the loopback names for a loopback bind (no DNS rebinding)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return ["127.0.0.1", "localhost", "[::1]", "::1"]
    return None


@dataclass
class RunningServer:
    """A labelling server running on a background thread (tests, benchmarks, notebooks)."""

    url: str
    server: LabellingServer
    _uvicorn: Any
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop serving and close the engine (the session's lock is released)."""
        self._uvicorn.should_exit = True
        self._thread.join(timeout=30)
        self.server.close()


def _uvicorn_server(app: Any) -> Any:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config)


def start_in_thread(
    session_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = 0,
    bands: str | Sequence[str] | None = None,
    auto_train: bool = True,
) -> RunningServer:
    """Serve a session on a background thread; return once it accepts connections."""
    server = LabellingServer.open(session_dir, bands=bands, auto_train=auto_train)
    try:
        sock = bind(host, port)
    except BaseException:
        server.close()
        raise
    uv = _uvicorn_server(server.app(_allowed_hosts(host)))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not uv.started:
        server.close()
        raise ConfigError(f"the labelling server on {_url(sock)} did not start")
    return RunningServer(_url(sock), server, uv, thread)


def serve(
    session_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    open_browser: bool = True,
    bands: str | Sequence[str] | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serve the web labeller of a session until Ctrl-C (``anneal-geo label --web``).

    The engine is built first (so a session that another process writes to is refused
    before any port is opened), then the port is bound, the URL printed and, unless
    ``open_browser`` is False, opened in the default browser.
    """
    server = LabellingServer.open(session_dir, bands=bands)
    try:
        sock = bind(host, port)
        url = _url(sock)
        if _allowed_hosts(host) is None:
            say(
                f"warning: listening on {host}: anyone who can reach this machine can answer "
                "this session's pairs"
            )
        progress = server.run(server.controller.progress).result()
        say(
            f"labelling {session_dir}: round {progress.round} of {progress.total_rounds - 1}, "
            f"{progress.budget_used} of {progress.budget_total} pairs answered"
        )
        say(f"open {url} in a browser (Ctrl-C stops the server; every answer is saved at once)")
        uv = _uvicorn_server(server.app(_allowed_hosts(host)))
        if open_browser:
            with contextlib.suppress(Exception):  # no browser here: the URL is printed
                threading.Timer(0.3, webbrowser.open, args=(url,)).start()
        # uvicorn stops on Ctrl-C (or SIGTERM) and then re-raises the signal: a normal stop.
        with contextlib.suppress(KeyboardInterrupt):
            uv.run(sockets=[sock])
        answered = server.run(lambda: len(server.controller.engine.store)).result()
    finally:
        server.close()
    say(
        f"stopped: {answered} pairs of {session_dir} are answered and saved; continue with "
        f"`anneal-geo label {session_dir} --web`"
    )
