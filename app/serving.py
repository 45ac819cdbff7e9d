"""Server processes: one uvicorn in this process, or N worker processes sharing the port.

With several workers each process binds its own socket with SO_REUSEPORT, so the kernel spreads
new connections over the processes. uvicorn's own --workers shares one listening socket, and a
burst of connections (eight kept-alive clients opening at once) is accepted by whichever process
wakes first: in bench/serve.py nearly all page traffic landed on one of two workers.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
from typing import Any

from app.errors import ConfigError
from app.settings import Settings, get_settings, to_environ


def serve(settings: Settings) -> None:
    """Serve until interrupted (Ctrl+C or SIGTERM), with settings.workers processes."""
    import uvicorn

    from app.main import create_app

    if settings.workers <= 1:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    access_log=settings.access_log)
        return
    # Workers read their settings from the environment; the model's CPU threads are split
    # between them so two text searches at once do not oversubscribe the cores.
    os.environ.update(to_environ(settings))
    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - not Linux/BSD/macOS
        uvicorn.run("app.main:create_app", factory=True, host=settings.host,
                    port=settings.port, workers=settings.workers,
                    access_log=settings.access_log)
        return
    # Bound (not listening, so it takes no connections) before any worker starts: a port in use
    # fails here, once, as a clear error.
    try:
        probe = _reuseport_socket(settings.host, settings.port, listen=False)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}; "
                          "pick another --port") from exc
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, name=f"saescope-worker-{n}")
             for n in range(settings.workers)]

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # uvicorn handles SIGTERM: finishes requests, runs shutdown
        for proc in procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
        probe.close()


def _reuseport_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    return sock


def _worker() -> None:
    """One worker process: its own app, its own socket on the shared port."""
    import uvicorn

    from app.main import create_app

    settings = get_settings()
    sock = _reuseport_socket(settings.host, settings.port)
    config = uvicorn.Config(create_app(settings), access_log=settings.access_log)
    uvicorn.Server(config).run(sockets=[sock])
