"""Real Redis and PostgreSQL clients (redis-py, psycopg 3) for the connection-fault tests.

Each mode prints one JSON object per line on stdout, flushed at once, with `t` the wall-clock
time in ns (time.time_ns()), so the test can time events against its own clock:
  {"event": "ready", ...}        the connection is open and the client is blocked on it
  {"event": "error", "errno": 103, "error": "...", "type": "..."}
  {"event": "message", "data": "..."}       (redis-subscribe)
  {"event": "writing"}, {"event": "done", "acked": [...], ...}    (writers)

Modes:
  pg-hold HOST PORT            BEGIN, then idle in the transaction until the socket wakes up
  pg-connect HOST PORT         one connection attempt (took_ns: how long it took)
  redis-connect HOST PORT      one PING on a fresh connection (took_ns: how long it took)
  redis-subscribe HOST PORT CHANNEL   print every published message until the connection breaks
  redis-loop HOST PORT INTERVAL_MS   a container's client loop: PING every INTERVAL_MS on one
      redis-py client (0.5 s timeouts, reconnecting as redis-py does), "pong" or "error" each time
  redis-get-loop HOST PORT KEY INTERVAL_MS SECONDS
      SET KEY once ("ready", with the connection's local port), then a GET every INTERVAL_MS on
      that one redis-py connection, waiting as long as the answer takes (no socket timeout, as
      redis-py's default): "got" with started (ns), took_ns, local_port; stops at an "error"
  tcp-eof-server PORT          accept one connection on 127.0.0.1:PORT ("listening" first), then
      "data" when its first bytes arrive and "eof" when the peer's close (FIN) does
  tcp-close HOST PORT          connect, send a few bytes ("sent"), wait 200 ms, then close
      ("closing", stamped just before close())
  tcp-sniff-echo PORT SIZE     capture lo (AF_PACKET), accept one connection on 127.0.0.1:PORT,
      read SIZE bytes and echo them back; "done" with the read sizes and the data sizes of the
      TCP segments to PORT that lo delivered
  tcp-echo-client HOST PORT SIZE   send SIZE patterned bytes, read them back: "echoed" (intact)
  redis-stream HOST PORT CHUNK INTERVAL_MS SECONDS
      GETs of a CHUNK-byte value every INTERVAL_MS, reconnecting when the connection breaks
  redis-writer HOST PORT PREFIX SECONDS
  pg-writer HOST PORT TABLE SECONDS
      numbered writes for SECONDS, retrying each until it is known to have landed; a write whose
      outcome is unknown (the connection broke before the answer) is checked before it is retried
"""

import errno as errno_names
import json
import sys
import time


def emit(event, **fields):
    fields["event"] = event
    fields["t"] = time.time_ns()
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def os_error(exc):
    """The OSError behind a client library's exception, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def error_fields(exc):
    cause = os_error(exc)
    number = cause.errno if cause else None
    return {
        "type": type(exc).__module__ + "." + type(exc).__name__,
        "error": str(exc).strip(),
        "errno": number,
        "errno_name": errno_names.errorcode.get(number) if number else None,
    }


def payload(i):
    # Long enough to span several segments; its content tells a partial write apart.
    return (f"{i:08d}:" * 512)[:4096]


def pg_connect(host, port):
    import psycopg

    return psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", connect_timeout=2)


def pg_hold(host, port):
    """An idle pooled connection inside an open transaction, as a pool holds it: waits for the
    socket to turn readable (the server spoke or the connection broke), then uses it."""
    import select

    conn = pg_connect(host, int(port))
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")  # opens the transaction (BEGIN)
    backend = cur.fetchone()[0]
    emit("ready", backend_pid=backend)
    select.select([conn.fileno()], [], [], 60)
    try:
        cur.execute("SELECT 1")
        emit("finished")
    except Exception as exc:  # noqa: BLE001 - any failure is what we report
        emit("error", **error_fields(exc))


def pg_connect_once(host, port):
    import psycopg  # imported before the clock starts

    start = time.time_ns()
    try:
        conn = pg_connect(host, int(port))
        conn.execute("SELECT 1")
        emit("connected", took_ns=time.time_ns() - start)
    except psycopg.Error as exc:
        emit("error", took_ns=time.time_ns() - start, **error_fields(exc))


def redis_client(host, port):
    import redis

    return redis.Redis(host=host, port=int(port), socket_connect_timeout=2, retry_on_timeout=False)


def redis_connect_once(host, port):
    import redis  # imported before the clock starts

    client = redis_client(host, port)
    start = time.time_ns()
    try:
        client.ping()
        emit("connected", took_ns=time.time_ns() - start)
    except redis.RedisError as exc:
        emit("error", took_ns=time.time_ns() - start, **error_fields(exc))


def redis_loop(host, port, interval_ms):
    import redis

    client = redis.Redis(
        host=host,
        port=int(port),
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry_on_timeout=False,
    )
    while True:
        start = time.time_ns()
        try:
            client.ping()
            emit("pong", took_ns=time.time_ns() - start)
        except redis.RedisError as exc:
            emit("error", took_ns=time.time_ns() - start, **error_fields(exc))
        time.sleep(int(interval_ms) / 1000)


def redis_get_loop(host, port, key, interval_ms, seconds):
    import redis

    # One connection, no retries: what the test watches is that connection's fate.
    client = redis.Redis(
        host=host,
        port=int(port),
        socket_connect_timeout=2,
        single_connection_client=True,
        retry_on_timeout=False,
    )
    value = b"v" * 100
    client.set(key, value)
    local_port = client.connection._sock.getsockname()[1]
    emit("ready", local_port=local_port)
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        started = time.time_ns()
        try:
            got = client.get(key)
        except redis.RedisError as exc:
            emit("error", started=started, took_ns=time.time_ns() - started, **error_fields(exc))
            return
        sock = client.connection._sock
        emit(
            "got",
            started=started,
            took_ns=time.time_ns() - started,
            intact=got == value,
            local_port=sock.getsockname()[1] if sock else None,
        )
        time.sleep(int(interval_ms) / 1000)


def tcp_eof_server(port):
    import socket

    server = socket.create_server(("127.0.0.1", int(port)))
    emit("listening")
    conn, _ = server.accept()
    first = True
    while True:
        data = conn.recv(65536)
        if not data:
            emit("eof")
            return
        if first:
            emit("data")
            first = False


def tcp_close(host, port):
    import socket

    sock = socket.create_connection((host, int(port)), timeout=5)
    emit("sent")
    sock.sendall(b"hello")
    time.sleep(0.2)
    emit("closing")
    sock.close()


def tcp_sniff_echo(port, size):
    import socket
    import struct

    port, size = int(port), int(size)
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sniff.bind(("lo", 0))
    server = socket.create_server(("127.0.0.1", port))
    emit("listening")
    conn, _ = server.accept()
    got, reads = b"", []
    while len(got) < size:
        data = conn.recv(65536)
        if not data:
            break
        reads.append(len(data))
        got += data
    conn.sendall(got)
    conn.close()
    sniff.setblocking(False)
    segments = []
    while True:
        try:
            frame, addr = sniff.recvfrom(70000)
        except BlockingIOError:
            break
        if addr[2] != socket.PACKET_HOST:
            continue
        ip = frame[14:]  # lo's (all-zero) Ethernet header
        if len(ip) < 40 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        ihl = (ip[0] & 15) * 4
        tcp = ip[ihl:]
        if struct.unpack("!H", tcp[2:4])[0] != port:
            continue
        data = struct.unpack("!H", ip[2:4])[0] - ihl - (tcp[12] >> 4) * 4
        if data > 0:
            segments.append(data)
    emit("done", reads=reads, segments=segments)


def tcp_echo_client(host, port, size):
    import socket

    size = int(size)
    payload = bytes(i % 251 for i in range(size))
    sock = socket.create_connection((host, int(port)), timeout=10)
    emit("sending")
    sock.sendall(payload)
    back = b""
    while len(back) < size:
        data = sock.recv(65536)
        if not data:
            break
        back += data
    emit("echoed", intact=back == payload, size=len(back))


def redis_stream(host, port, chunk, interval_ms, seconds):
    """GETs a value of `chunk` bytes every `interval_ms` on one connection, counting the bytes
    it carried (requests and replies as they cross the wire); when it breaks, reports how many,
    then reconnects and goes on. Plain RESP over a socket: redis-py would hide a reset of an idle
    pooled connection by reconnecting before the next command."""
    import socket

    key = f"stream:{time.time_ns()}".encode()
    value = b"x" * int(chunk)

    def command(*parts):
        out = b"*%d\r\n" % len(parts)
        for part in parts:
            out += b"$%d\r\n%s\r\n" % (len(part), part)
        return out

    def call(sock, request, reply_len):
        sock.sendall(request)
        got = 0
        while got < reply_len:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError(errno_names.ECONNRESET, "connection closed by peer")
            got += len(data)
        return len(request) + got

    get = command(b"GET", key)
    get_reply = len(b"$%d\r\n" % len(value)) + len(value) + 2
    end = time.monotonic() + float(seconds)
    while time.monotonic() < end:
        carried = 0
        try:
            sock = socket.create_connection((host, int(port)), timeout=2)
            carried += call(sock, command(b"SET", key, value), len(b"+OK\r\n"))
            emit("connected")
            while time.monotonic() < end:
                carried += call(sock, get, get_reply)
                time.sleep(int(interval_ms) / 1000)
            emit("finished", carried=carried)
        except OSError as exc:
            emit("error", carried=carried, **error_fields(exc))


def redis_subscribe(host, port, channel):
    client = redis_client(host, port)
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    try:
        while True:
            msg = pubsub.get_message(timeout=5)
            if msg is None:
                continue
            if msg["type"] == "subscribe":
                emit("ready")
            elif msg["type"] == "message":
                emit("message", data=msg["data"].decode())
    except Exception as exc:  # noqa: BLE001
        emit("error", **error_fields(exc))


def writer(seconds, write, landed, reconnect):
    """Writes 0, 1, 2, ... for `seconds`. `write(i)` raises when the answer did not arrive;
    `landed(i)` says whether an unanswered write is in the store."""
    acked, verified, errors, first_error = [], [], 0, None
    end = time.monotonic() + float(seconds)
    i = 0
    while time.monotonic() < end:
        try:
            write(i)
            acked.append(i)
            if i == 0:
                emit("writing")
            i += 1
            continue
        except Exception as exc:  # noqa: BLE001
            errors += 1
            if first_error is None:
                first_error = error_fields(exc)
        # Unknown outcome: reconnect (retrying while refused), then look before writing again.
        while time.monotonic() < end + 30:
            try:
                reconnect()
                if landed(i):
                    verified.append(i)
                    i += 1
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.01)
    emit("done", acked=acked, verified=verified, errors=errors, first_error=first_error, next=i)


def redis_writer(host, port, prefix, seconds):
    state = {"client": redis_client(host, port)}

    def write(i):
        if not state["client"].set(f"{prefix}:{i}", payload(i)):
            raise RuntimeError(f"SET {i} not acknowledged")

    def landed(i):
        return state["client"].exists(f"{prefix}:{i}") == 1

    def reconnect():
        state["client"] = redis_client(host, port)
        state["client"].ping()

    writer(seconds, write, landed, reconnect)


def pg_writer(host, port, table, seconds):
    state = {"conn": pg_connect(host, int(port))}
    state["conn"].execute(f"CREATE TABLE IF NOT EXISTS {table} (id integer, payload text)")
    state["conn"].commit()

    def write(i):
        with state["conn"].transaction():
            state["conn"].execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, payload(i)))

    def landed(i):
        row = state["conn"].execute(f"SELECT count(*) FROM {table} WHERE id = %s", (i,)).fetchone()
        state["conn"].commit()
        return row[0] > 0

    def reconnect():
        try:
            state["conn"].close()
        except Exception:  # noqa: BLE001
            pass
        state["conn"] = pg_connect(host, int(port))

    writer(seconds, write, landed, reconnect)


MODES = {
    "pg-hold": pg_hold,
    "pg-connect": pg_connect_once,
    "redis-connect": redis_connect_once,
    "redis-subscribe": redis_subscribe,
    "redis-loop": redis_loop,
    "redis-get-loop": redis_get_loop,
    "redis-stream": redis_stream,
    "tcp-eof-server": tcp_eof_server,
    "tcp-close": tcp_close,
    "tcp-sniff-echo": tcp_sniff_echo,
    "tcp-echo-client": tcp_echo_client,
    "redis-writer": redis_writer,
    "pg-writer": pg_writer,
}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
