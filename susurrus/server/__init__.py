"""`susurrus serve`: an OpenAI-compatible transcription server with a web page.

Needs the server extra: pip install "susurrus[server]".
"""

from __future__ import annotations

import logging

from .settings import Settings, parse_args

__all__ = ["Settings", "create_app", "main", "serve"]


def create_app(settings: Settings):  # noqa: ANN201 (FastAPI is an optional dependency)
    from .app import create_app as build

    return build(settings)


def serve(settings: Settings) -> None:
    """Run the server until SIGINT or SIGTERM: it then stops accepting connections, lets
    running requests finish for up to `shutdown_timeout` seconds, cancels the rest and exits."""
    import uvicorn

    _limit_malloc_arenas()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.shutdown_timeout,
        # Without a limit on waiting connections, a burst would queue in the kernel unseen.
        limit_concurrency=max(64, 4 * settings.max_sessions),
    )
    uvicorn.Server(config).run()


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives every thread that allocates its own heap arena and keeps what each one
    frees; with a thread per session that grows resident memory with the session count.
    Must run before the worker threads start."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def main(argv: list[str]) -> int:
    from ..errors import SusurrusError

    try:
        settings = parse_args(argv)
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except SusurrusError as exc:
        print(f"susurrus serve: error: {exc}", flush=True)
        return 2
    except ImportError as exc:
        print(
            f"susurrus serve: error: {exc.name} is not installed; the server needs "
            'pip install "susurrus[server]"',
            flush=True,
        )
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(settings)
    return 0
