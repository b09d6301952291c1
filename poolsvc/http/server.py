"""The HTTP port: uvicorn serving the app as a task on the gRPC server's event loop, with the
server's TLS settings. Its life follows the gRPC port's (service/server.py): it listens at once,
answers 503 while models load and while draining, and closes when the gRPC port does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from poolsvc.config import ServerConfig

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        # The process's signals are the gRPC server's to handle (its drain stops this server
        # too); uvicorn's own handlers would replace them.
        yield


class HttpServer:
    def __init__(self, config: ServerConfig, app):
        host = config.host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        port = 0 if config.http_port == -1 else config.http_port
        try:
            self._socket = _listen(host, port, family)
        except OSError as exc:
            raise ListenError(f"cannot serve HTTP on {config.host}:{port}: {exc.strerror}; "
                              "choose another port with --http-port (0: off)") from None
        self.port = self._socket.getsockname()[1]
        self.tls = bool(config.tls_cert)
        settings = dict(log_config=None, access_log=False, lifespan="off", server_header=False,
                        timeout_graceful_shutdown=1, timeout_keep_alive=5)
        if self.tls:
            settings.update(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
            if config.tls_client_ca:
                settings.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        self._server = _Server(uvicorn.Config(app, **settings))
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self._socket.getsockname()[0]}:{self.port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ListenError("the HTTP server stopped as it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Closes the port and the open connections (every call has been answered by now)."""
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        await self._task


def _listen(host: str, port: int, family: int) -> socket.socket:
    """A listening TCP socket. Its protocol is named (IPPROTO_TCP, not 0): asyncio turns Nagle's
    algorithm off only on connections whose socket says TCP, and with it on, a response whose
    headers and body are written apart waits ~40 ms for the client's delayed ACK."""
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class ListenError(RuntimeError):
    """The HTTP port cannot be listened on; the message names the flag to change."""
