"""A local single-node Apache Kafka broker (KRaft mode) without Docker.

The broker jars are fetched once from Maven Central with Maven (``mvn``, using
the ``pom.xml`` next to this file) into :func:`cache_dir`, then the broker runs
as ``java -cp 'libs/*' kafka.Kafka server.properties``. Needs ``mvn`` and a
Java 17+ runtime on ``PATH``.

Two ways to use it:

* :class:`LocalKafka` - a broker owned by this Python process (tests)::

      with LocalKafka() as kafka:
          run_against(kafka.bootstrap)

* :func:`start_detached` / :func:`status_detached` / :func:`stop_detached` -
  one broker per cache dir that outlives the Python process; this is what
  ``soundcheck kafka start|status|stop`` (see :func:`add_cli`) drives.

>>> KAFKA_VERSION
'4.1.1'
>>> 0 < free_port() < 65536
True
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import weakref
from collections.abc import Coroutine, Iterator, Mapping
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "KAFKA_VERSION",
    "BrokerError",
    "LocalKafka",
    "add_cli",
    "broker_answers",
    "cache_dir",
    "ensure_jars",
    "free_port",
    "start_detached",
    "status_detached",
    "stop_detached",
]

KAFKA_VERSION = "4.1.1"
DEFAULT_PORT = 9092

_MARKER = "COMPLETE"
_MVN_TIMEOUT_S = 900.0
_TAIL_LINES = 30
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_HINT = "or set KAFKA_BOOTSTRAP_SERVERS to use a broker you already have"
_T = TypeVar("_T")

_LOG4J2 = """\
# Written by soundcheck.kafka.local: broker warnings and errors go to stdout,
# which the launcher redirects to kafka.log next to this file.
status = warn
shutdownHook = disable
appender.out.type = Console
appender.out.name = OUT
appender.out.target = SYSTEM_OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
# one INFO line per start/stop of the server
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
"""


class BrokerError(RuntimeError):
    """The local broker could not be fetched, started or stopped; the message says why and what to do."""


# --------------------------------------------------------------------------- helpers


def cache_dir() -> Path:
    """Where jars and the detached broker live: ``$SOUNDCHECK_CACHE_DIR`` or ``~/.cache/soundcheck``."""
    env = os.environ.get("SOUNDCHECK_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "soundcheck"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    """Whether a listener could bind 127.0.0.1:``port`` (with SO_REUSEADDR, as the JVM does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    return "\n".join(_ANSI.sub("", text).rstrip().splitlines()[-lines:])


def _file_tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            return _tail(f.read().decode("utf-8", "replace"), lines) or "(empty)"
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home, "bin", "java"), os.X_OK):
        return str(Path(home, "bin", "java"))
    java = shutil.which("java")
    if java is None:
        raise BrokerError(
            "java not found: the local Kafka broker needs a Java 17+ runtime on PATH or in JAVA_HOME "
            f"(e.g. `apt-get install openjdk-17-jre-headless`), {_HINT}"
        )
    return java


def _cluster_id() -> str:
    """A random Kafka cluster id (base64url of a UUID, like ``kafka-storage random-uuid``)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run`` that also works when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


# --------------------------------------------------------------------------- jars


def ensure_jars(version: str = KAFKA_VERSION, *, quiet: bool = False) -> Path:
    """Return ``cache_dir()/kafka-<version>/libs`` holding the broker jars, fetching them first if needed.

    Runs ``mvn dependency:copy-dependencies`` into a temp dir and renames it into
    place, then writes a marker file; concurrent callers serialise on a file lock.
    Prints one progress line to stderr unless ``quiet``.
    """
    root = cache_dir() / f"kafka-{version}"
    libs, marker = root / "libs", root / _MARKER
    if marker.is_file():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(
            "mvn not found: the local Kafka broker fetches its jars from Maven Central with Maven "
            f"(e.g. `apt-get install maven`), {_HINT}"
        )
    _java()  # Maven needs it as well; fail with the clearer message
    with _locked(root / ".lock"):
        if marker.is_file():  # another process fetched them while we waited
            return libs
        if not quiet:
            print(f"fetching Apache Kafka {version} from Maven Central ...", end=" ", file=sys.stderr, flush=True)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
        try:
            pom = work / "pom.xml"
            pom.write_bytes(resources.files(__name__).joinpath("pom.xml").read_bytes())
            cmd = [
                mvn, "-B", "-q", "-Dstyle.color=never", "-f", str(pom), f"-Dkafka.version={version}",
                "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={work / 'libs'}",
            ]  # fmt: skip
            try:
                done = subprocess.run(
                    cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, errors="replace", timeout=_MVN_TIMEOUT_S, check=False,
                )  # fmt: skip
                output, code = done.stdout, done.returncode
            except subprocess.TimeoutExpired as exc:
                output, code = str(exc.output or ""), None
            if code != 0 or not any((work / "libs").glob("kafka_2.13-*.jar")):
                if not quiet:
                    print("failed", file=sys.stderr)
                why = f"timed out after {_MVN_TIMEOUT_S:.0f} s" if code is None else f"exit code {code}"
                raise BrokerError(
                    f"could not fetch Apache Kafka {version} from Maven Central with Maven ({why}); "
                    f"check that Maven Central is reachable and that version {version} exists.\n"
                    f"$ {' '.join(cmd)}\n{_tail(output) or '(no output)'}"
                )
            if libs.exists():  # left over from an interrupted fetch (no marker)
                shutil.rmtree(libs)
            os.replace(work / "libs", libs)
            jars = sorted(p.name for p in libs.glob("*.jar"))
            _write_atomic(marker, json.dumps({"version": version, "jars": jars}, indent=1) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return libs


# --------------------------------------------------------------------------- probing


async def _probe(bootstrap: str, timeout: float) -> bool:
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import KafkaError

    client = AIOKafkaClient(
        bootstrap_servers=bootstrap, client_id="soundcheck-probe", request_timeout_ms=max(1000, int(timeout * 1000))
    )
    try:
        await client.bootstrap()
        # a fresh request over the *advertised* address, not just the bootstrap one
        metadata = await client.fetch_all_metadata()
        return bool(metadata.brokers())
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await client.close()


def broker_answers(bootstrap: str, timeout: float = 5.0) -> bool:
    """Whether a Kafka broker at ``host:port`` answers a metadata request listing at least one broker."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:  # cheap TCP check first, so aiokafka doesn't log connection errors while the broker boots
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 2.0)).close()
    except (OSError, ValueError):
        return False
    return _run_sync(_probe(bootstrap, timeout))


# --------------------------------------------------------------------------- processes


def _pid_is_broker(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) ``kafka.Kafka`` java process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path("/proc", str(pid))
    if not proc.is_dir():  # no procfs: trust kill(0)
        return True
    try:
        state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        cmdline = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and b"kafka.Kafka" in cmdline


def _terminate(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM the process group led by ``pid``, wait up to ``timeout`` s, then SIGKILL it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc is not None and proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 10.0)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
                return
        else:
            while _pid_is_broker(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not _pid_is_broker(pid):
                return
    raise BrokerError(f"Kafka broker process {pid} did not exit after SIGKILL")


@dataclasses.dataclass
class _Owned:
    """What a :class:`LocalKafka` must release, kept apart from it so a finalizer can run without it."""

    proc: subprocess.Popen[bytes] | None = None
    temp_dir: Path | None = None

    def stop_process(self, timeout: float) -> None:
        if self.proc is not None:
            _terminate(self.proc.pid, self.proc, timeout)
            self.proc = None

    def release(self, timeout: float = 10.0) -> None:
        self.stop_process(timeout)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class LocalKafka:
    """A single-node KRaft broker+controller running as a child ``java`` process.

    ``data_dir`` holds ``server.properties``, ``log4j2.properties``, the broker log
    ``kafka.log`` and the partitions (``kafka-logs/``); when it is ``None`` a temp
    dir is used and deleted by :meth:`stop`. Ports default to free ones. The
    broker is stopped when the object is garbage-collected or at interpreter exit.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        heap: str = "512m",
        version: str = KAFKA_VERSION,
        sasl_users: Mapping[str, str] | None = None,
        sasl_port: int | None = None,
    ) -> None:
        self._owned = _Owned()
        #: users (name -> password) of an extra SASL_PLAINTEXT listener (PLAIN, SCRAM-SHA-256 and
        #: SCRAM-SHA-512), for testing authenticated clients; the PLAINTEXT listener stays
        self.sasl_users = dict(sasl_users or {})
        for name, password in self.sasl_users.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or any(c in password for c in '"\\,=[]'):
                raise ValueError(f"SASL user {name!r}: use [A-Za-z0-9_.-] for names and no quotes, commas, '=' or brackets in passwords")
        self.sasl_port = (sasl_port or free_port()) if self.sasl_users else None
        if data_dir is None:
            data_dir = self._owned.temp_dir = Path(tempfile.mkdtemp(prefix="soundcheck-kafka-"))
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.heap = heap
        self.version = version
        self._finalizer = weakref.finalize(self, self._owned.release)

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<LocalKafka {self.version} {self.bootstrap} {state} data_dir={self.data_dir}>"

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` string, ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_PLAINTEXT listener's ``bootstrap.servers`` (only with ``sasl_users``)."""
        if self.sasl_port is None:
            raise BrokerError("this broker has no SASL listener: pass sasl_users to LocalKafka")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def log_path(self) -> Path:
        """The broker's stdout/stderr and log4j output."""
        return self.data_dir / "kafka.log"

    @property
    def pid(self) -> int | None:
        """The java process id while it runs."""
        return self._owned.proc.pid if self.is_running() and self._owned.proc else None

    def is_running(self) -> bool:
        """Whether the java process is alive (it may not answer yet, see :meth:`start`)."""
        return self._owned.proc is not None and self._owned.proc.poll() is None

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker and return its bootstrap address once it answers metadata requests.

        Fetches the jars first if needed (not counted in ``timeout``), and formats
        the storage with a fresh cluster id if ``data_dir`` is new. Raises
        :class:`BrokerError` if the broker exits early or doesn't answer within
        ``timeout`` seconds; the process is stopped in that case.
        """
        if self.is_running():
            return self.bootstrap
        libs = ensure_jars(self.version)
        java = _java()
        for port in (self.port, self.controller_port, self.sasl_port):
            if port is not None and not _port_free(port):
                raise BrokerError(f"port {port} on 127.0.0.1 is already in use; pick another one for the Kafka broker")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The java process inherits this locked file and holds the lock for as long as it
        # lives: a second broker on the same data dir would corrupt the metadata log.
        with (self.data_dir / ".broker.lock").open("a") as lock, self.log_path.open("ab") as log:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BrokerError(
                    f"another Kafka broker is using {self.data_dir}; stop it first or use another data dir"
                ) from None
            self._write_config()
            if not (self.data_dir / "kafka-logs" / "meta.properties").is_file():
                self._format(java, libs)
            log.write(f"=== soundcheck: starting Kafka {self.version} on {self.bootstrap} ===\n".encode())
            log.flush()
            self._owned.proc = subprocess.Popen(
                [*self._jvm(java, libs, f"-Xmx{self.heap}", f"-Xms{self.heap}", "-Djava.awt.headless=true"),
                 "kafka.Kafka", str(self.data_dir / "server.properties")],
                cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, pass_fds=(lock.fileno(),),
            )  # fmt: skip
        try:
            self._wait_until_answering(timeout)
        except BaseException:
            self._owned.stop_process(10.0)
            raise
        return self.bootstrap

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the broker's process group, SIGKILL it after ``timeout`` s; delete a temp data dir."""
        self._owned.stop_process(timeout)
        if self._owned.temp_dir is not None:
            shutil.rmtree(self._owned.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _detach(self) -> subprocess.Popen[bytes] | None:
        """Stop owning the process: it keeps running after this object and this interpreter are gone."""
        self._finalizer.detach()
        proc, self._owned.proc = self._owned.proc, None
        return proc

    def _write_config(self) -> None:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "kafka-logs"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        if self.sasl_users:
            sasl = f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}"
            props["listeners"] = props["listeners"].replace(",CONTROLLER", f",{sasl},CONTROLLER")
            props["advertised.listeners"] += f",{sasl}"
            props["listener.security.protocol.map"] += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
            props["sasl.enabled.mechanisms"] = "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512"
            users = " ".join(f'user_{name}="{pw}"' for name, pw in self.sasl_users.items())
            prefix = "listener.name.sasl_plaintext"
            props[f"{prefix}.plain.sasl.jaas.config"] = f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            for mech in ("scram-sha-256", "scram-sha-512"):
                props[f"{prefix}.{mech}.sasl.jaas.config"] = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        text = "# Written by soundcheck.kafka.local on each start.\n" + "".join(f"{k}={v}\n" for k, v in props.items())
        (self.data_dir / "server.properties").write_text(text)
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)

    def _jvm(self, java: str, libs: Path, *options: str) -> list[str]:
        """``java`` with ``options``, our log4j2 config and the broker classpath; the main class comes next."""
        log4j2 = f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}"
        return [java, *options, log4j2, "-cp", str(libs / "*")]

    def _format(self, java: str, libs: Path) -> None:
        cmd = [*self._jvm(java, libs, "-Xmx256m"), "kafka.tools.StorageTool", "format", "--ignore-formatted",
               "-t", _cluster_id(), "-c", str(self.data_dir / "server.properties")]  # fmt: skip
        for name, password in self.sasl_users.items():  # SCRAM credentials live in the metadata log
            for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                cmd += ["--add-scram", f"{mech}=[name={name},password={password}]"]
        done = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", timeout=120, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage in {self.data_dir} failed (exit code {done.returncode}):\n"
                f"$ {re.sub(r'password=[^],]*', 'password=***', ' '.join(cmd))}\n{_tail(done.stdout) or '(no output)'}"
            )

    def _wait_until_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._owned.proc
            assert proc is not None
            if proc.poll() is not None:
                raise BrokerError(
                    f"the Kafka broker exited during startup with code {proc.returncode}; "
                    f"last lines of {self.log_path}:\n{_file_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerError(
                    f"the Kafka broker did not answer on {self.bootstrap} within {timeout:.0f} s; "
                    f"last lines of {self.log_path}:\n{_file_tail(self.log_path)}"
                )
            if broker_answers(self.bootstrap, timeout=min(5.0, remaining)):
                return
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------- detached broker

# brokers this process started detached, so stop_detached() in the same process can reap them
_DETACHED: dict[int, subprocess.Popen[bytes]] = {}


def _broker_home() -> Path:
    return cache_dir() / "broker"


def _read_state() -> dict[str, Any] | None:
    try:
        state = json.loads((_broker_home() / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("pid"), int) else None


def _clear_state() -> None:
    (_broker_home() / "state.json").unlink(missing_ok=True)


def start_detached(port: int | None = None, *, timeout: float = 90.0) -> dict[str, Any]:
    """Start the cache dir's broker so it outlives this process, or return the one already running.

    Data lives in ``cache_dir()/broker/data``; the port defaults to 9092 when free,
    else a free one. Returns the state also saved in ``cache_dir()/broker/state.json``:
    ``pid``, ``bootstrap``, ``port``, ``data_dir``, ``log``, ``version``, ``started_at``.
    """
    home = _broker_home()
    with _locked(home / ".lock"):
        state = _read_state()
        if state is not None and _pid_is_broker(state["pid"]):
            if broker_answers(state["bootstrap"]):
                return state
            _terminate(state["pid"], _DETACHED.pop(state["pid"], None), 30.0)  # alive but wedged
        _clear_state()
        if port is None:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()
        kafka = LocalKafka(data_dir=home / "data", port=port)
        kafka.start(timeout)
        proc = kafka._detach()
        assert proc is not None
        _DETACHED[proc.pid] = proc
        state = {
            "pid": proc.pid,
            "bootstrap": kafka.bootstrap,
            "port": kafka.port,
            "controller_port": kafka.controller_port,
            "data_dir": str(kafka.data_dir),
            "log": str(kafka.log_path),
            "version": kafka.version,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _write_atomic(home / "state.json", json.dumps(state, indent=1) + "\n")
        return state


def status_detached() -> dict[str, Any] | None:
    """The saved state of the cache dir's broker plus ``answering`` (bool) if its process is alive, else None."""
    state = _read_state()
    if state is None or not _pid_is_broker(state["pid"]):
        return None
    return {**state, "answering": broker_answers(state["bootstrap"], timeout=3.0)}


def stop_detached(timeout: float = 30.0) -> bool:
    """Stop the cache dir's broker; True if one was running."""
    home = _broker_home()
    if not home.is_dir():
        return False
    with _locked(home / ".lock"):
        state = _read_state()
        running = state is not None and _pid_is_broker(state["pid"])
        if state is not None and running:
            _terminate(state["pid"], _DETACHED.pop(state["pid"], None), timeout)
        _clear_state()
        return running


# --------------------------------------------------------------------------- CLI


def add_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``kafka start [--port N] | stop | status`` to an argparse ``subparsers``; each sets ``func(args) -> int``."""
    kafka = subparsers.add_parser(
        "kafka",
        help="run a local Apache Kafka broker (no Docker; needs mvn and java)",
        description=(
            f"Run a single-node Apache Kafka {KAFKA_VERSION} broker on 127.0.0.1, fetched from Maven Central "
            f"with Maven into {cache_dir()}. It keeps running until `kafka stop`. "
            "Tip: export KAFKA_BOOTSTRAP_SERVERS=$(soundcheck kafka start)"
        ),
    )
    actions = kafka.add_subparsers(dest="kafka_action", metavar="ACTION", required=True)
    start = actions.add_parser("start", help="start the broker (or reuse the running one), print its bootstrap")
    start.add_argument("--port", type=int, default=None, help=f"listener port (default {DEFAULT_PORT} if free)")
    start.set_defaults(func=_cli_start)
    actions.add_parser("stop", help="stop the broker").set_defaults(func=_cli_stop)
    actions.add_parser("status", help="show whether the broker runs (exit code 1 if not)").set_defaults(
        func=_cli_status
    )
    return kafka


def _cli_start(args: argparse.Namespace) -> int:
    try:
        state = start_detached(args.port)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(state["bootstrap"], flush=True)
    print(
        f"Kafka {state['version']} broker running on {state['bootstrap']} (pid {state['pid']}, log {state['log']}); "
        "stop it with: soundcheck kafka stop",
        file=sys.stderr,
    )
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    try:
        stopped = stop_detached()
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("Kafka broker stopped" if stopped else "no Kafka broker was running", file=sys.stderr)
    return 0


def _cli_status(args: argparse.Namespace) -> int:
    state = status_detached()
    if state is None:
        print("not running")
        return 1
    answering = "" if state["answering"] else " (process alive but not answering)"
    print(f"running{answering}: bootstrap {state['bootstrap']} pid {state['pid']} log {state['log']}")
    return 0
