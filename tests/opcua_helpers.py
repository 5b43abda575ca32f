"""Real OPC UA peers for the driver tests: a plain asyncua server, certificates made with
``cryptography``, a TCP server that never answers, and a proxy that can go silent."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from asyncua import Node, Server, ua
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from drivers.base import Quality, Sample

NAMESPACE = "urn:bedside:test:reactor"
SERVER_URI = "urn:bedside:test:server"
CLIENT_URI = "urn:bedside:test:client"

# name -> (initial value, variant type, writable)
VARIABLES: dict[str, tuple[Any, ua.VariantType, bool]] = {
    "Temperature": (37.0, ua.VariantType.Double, True),
    "Setpoint": (37.0, ua.VariantType.Double, True),
    "Stirrer": (60, ua.VariantType.UInt16, True),
    "Mode": ("auto", ua.VariantType.String, True),
    "Locked": (1.5, ua.VariantType.Double, False),
}


@dataclass(frozen=True)
class Certificate:
    """A certificate and its private key written to files."""

    cert: Path
    key: Path


def make_certificate(directory: Path, name: str, uri: str) -> Certificate:
    """A self-signed RSA 2048 certificate usable by an OPC UA client or server."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(uri),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{name}.der"
    key_path = directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Certificate(cert_path, key_path)


class PlainServer:
    """An asyncua server with ``Objects/2:Reactor`` holding ``VARIABLES`` and a ``2:Multiply``
    method (two Doubles in, their product out; ``BadInvalidArgument`` for a negative factor).

    ``id_base`` chooses the numeric NodeIds, so two servers on the same port can number the
    same nodes differently. With ``certificate`` and ``trusted`` (a folder of client
    certificates) it offers only Basic256Sha256 SignAndEncrypt and accepts only trusted clients.
    """

    def __init__(
        self,
        port: int,
        *,
        id_base: int = 1000,
        certificate: Certificate | None = None,
        trusted: Path | None = None,
    ) -> None:
        self.port = port
        self.endpoint = f"opc.tcp://127.0.0.1:{port}"
        self.id_base = id_base
        self._certificate = certificate
        self._trusted = trusted
        self.server = Server()
        self.nodes: dict[str, Node] = {}
        self.idx = 0

    async def start(self) -> None:
        """Build the address space and listen."""
        server = self.server
        await server.init()
        server.disable_clock()  # its 1 s time loop would make stop() wait
        server.set_endpoint(self.endpoint)
        await server.set_application_uri(SERVER_URI)
        if self._certificate is not None:
            await server.load_certificate(str(self._certificate.cert))
            await server.load_private_key(str(self._certificate.key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
            store = TrustStore([self._trusted] if self._trusted else [], [])
            await store.load()
            options = (
                CertificateValidatorOptions.TRUSTED_VALIDATION
                | CertificateValidatorOptions.PEER_CLIENT
            )
            server.set_certificate_validator(CertificateValidator(options, store))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        self.idx = await server.register_namespace(NAMESPACE)
        next_id = iter(range(self.id_base, self.id_base + 100))
        reactor = await server.nodes.objects.add_object(
            ua.NodeId(next(next_id), self.idx), ua.QualifiedName("Reactor", self.idx)
        )
        self.nodes["Reactor"] = reactor
        for name, (value, vtype, writable) in VARIABLES.items():
            node = await reactor.add_variable(
                ua.NodeId(next(next_id), self.idx),
                ua.QualifiedName(name, self.idx),
                ua.Variant(value, vtype),
            )
            if writable:
                await node.set_writable()
            self.nodes[name] = node
        double = ua.NodeId(ua.ObjectIds.Double)
        self.nodes["Multiply"] = await reactor.add_method(
            ua.NodeId(next(next_id), self.idx),
            ua.QualifiedName("Multiply", self.idx),
            _multiply,
            [ua.Argument("a", double, -1), ua.Argument("b", double, -1)],
            [ua.Argument("product", double, -1)],
        )
        await server.start()

    async def stop(self) -> None:
        """Stop listening and drop every connection and session."""
        await stop_server(self.server)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def node_id(self, name: str) -> str:
        """The NodeId text of a node of this server."""
        return self.nodes[name].nodeid.to_string()

    async def set(self, name: str, value: Any, status: int = ua.StatusCodes.Good) -> None:
        """Set a variable server-side, with a status code (its value is dropped when bad)."""
        _, vtype, _ = VARIABLES[name]
        await self.nodes[name].write_value(
            ua.DataValue(
                ua.Variant(value, vtype),
                StatusCode=ua.StatusCode(status),
                SourceTimestamp=dt.datetime.now(dt.UTC),
            )
        )


class ThreadedServer:
    """A ``PlainServer`` on its own event loop in a thread, shared by many tests.

    Building an asyncua server costs about a second (its standard address space), so tests that
    only need a server in its initial state share this one (``reset()`` restores the values).
    It runs outside the tests' event loops, so their leaked-task guard does not see it.
    """

    def __init__(self, port: int) -> None:
        self.plain = PlainServer(port)
        self.endpoint = self.plain.endpoint
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.plain.start()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._ready.set()
        await self._stop.wait()
        await self.plain.stop()

    def start(self) -> None:
        """Start the thread and wait until the server listens."""
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("the shared OPC UA server did not start") from self._error

    def stop(self) -> None:
        """Stop the server and its thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def set(self, name: str, value: Any, status: int = ua.StatusCodes.Good) -> None:
        """``PlainServer.set`` on the server's thread."""
        await self._run(self.plain.set(name, value, status))

    async def reset(self) -> None:
        """Restore every variable's initial value."""
        for name, (value, _, _) in VARIABLES.items():
            await self.set(name, value)

    def node_id(self, name: str) -> str:
        return self.plain.node_id(name)

    @property
    def id_base(self) -> int:
        return self.plain.id_base

    def subscription_count(self) -> int:
        """How many subscriptions the server holds."""
        return len(self.plain.server.iserver.subscription_service.subscriptions)


async def stop_server(server: Server) -> None:
    """Stop an asyncua server, closing the sessions it keeps after their connection is gone.

    asyncua keeps a session with subscriptions alive after its connection drops (so a client
    could reactivate it, as the spec allows), and ``Server.stop()`` leaves those sessions' tasks
    running; a killed server must not leave any.
    """
    await server.stop()
    sessions = server.iserver._external_sessions  # no public accessor in asyncua 2.1
    for session in list(sessions.values()):
        await session.close_session(True)


async def _multiply(parent: ua.NodeId, a: ua.Variant, b: ua.Variant) -> Any:
    if a.VariantType != ua.VariantType.Double or b.VariantType != ua.VariantType.Double:
        return ua.StatusCode(ua.StatusCodes.BadTypeMismatch)
    if a.Value < 0 or b.Value < 0:
        return ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
    return [ua.Variant(a.Value * b.Value, ua.VariantType.Double)]


@contextlib.asynccontextmanager
async def silent_server(port: int) -> AsyncIterator[None]:
    """A TCP server that accepts connections and reads but never answers."""
    open_writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", port)
    try:
        yield
    finally:
        for writer in open_writers:
            writer.close()
        server.close()
        await server.wait_closed()


class Proxy:
    """A loopback TCP proxy that can go silent (stop forwarding without closing sockets),
    to play a server that hangs in the middle of a session."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.silent = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.listen_port}"

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                if not self.silent:
                    dst.write(data)
        dst.close()


async def next_matching(
    stream: AsyncIterator[Sample],
    predicate: Callable[[Sample], bool],
    within: float = 10.0,
) -> Sample:
    """The next sample of ``stream`` matching ``predicate`` (fails the test after ``within`` s)."""
    async with asyncio.timeout(within):
        async for sample in stream:
            if predicate(sample):
                return sample
    raise AssertionError("stream ended")


def good(tag: str, value: Any = None) -> Callable[[Sample], bool]:
    """A predicate: a good sample of ``tag`` (with ``value`` if given)."""
    return lambda s: (
        s.tag == tag and s.quality is Quality.GOOD and (value is None or s.value == value)
    )


def bad(tag: str) -> Callable[[Sample], bool]:
    """A predicate: a bad sample of ``tag``."""
    return lambda s: s.tag == tag and s.quality is Quality.BAD


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll ``check`` until it is true (fails the test after ``within`` seconds)."""
    async with asyncio.timeout(within):
        while not await check():  # noqa: ASYNC110 - polls a remote peer, nothing to wait on
            await asyncio.sleep(0.02)


O6_URI = "urn:bedside:test:o6"


def run_o6_server(port: int) -> None:
    """Serve a small reactor on an open62541 server (PyPI package ``o6``) until stdin closes.

    Runs in a subprocess (``python -m tests.opcua_helpers o6 PORT``) so the native stack and its
    threads stay out of the test's event loop. Nodes are in namespace 1 (URI ``O6_URI``):
    ``Objects/Reactor/{Temperature: Double rw, Stirrer: UInt16 rw, Locked: Double r,
    Multiply(a: Double, b: Double) -> Double}``; Multiply refuses a negative factor.
    """
    import sys

    import numpy as np
    import o6
    from o6.ns import ns0

    server = o6.Server(port=port, applicationUri=O6_URI)
    reactor = server.addObject("Reactor", server.objectsNode, ns=1)
    server.addVariable("Temperature", reactor, 37.0, ns=1)
    server.addVariable("Stirrer", reactor, np.uint16(60), ns=1)
    server.addVariable("Locked", reactor, 1.5, writable=False, ns=1)

    def multiply(node: Any, a: float, b: float) -> tuple[Any, ...]:
        if a < 0 or b < 0:
            return (o6.StatusCode.BAD_INVALID_ARGUMENT,)
        return (o6.StatusCode.GOOD, float(a * b))

    double = o6.NodeId(ns0.datatypes.Double)
    arg = ns0.datatypes.Argument
    server.addMethod(
        "Multiply",
        reactor,
        multiply,
        inputArgs=[
            arg(name="a", dataType=double, valueRank=-1),
            arg(name="b", dataType=double, valueRank=-1),
        ],
        outputArgs=[arg(name="product", dataType=double, valueRank=-1)],
        ns=1,
    )
    server.start()
    print("ready", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["o6"]:
        run_o6_server(int(sys.argv[2]))
