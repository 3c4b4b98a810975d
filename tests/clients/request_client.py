"""Real clients (redis-py, psycopg 3, and raw sockets for hand-cut segments) for the tests of
request matches. Each mode runs a fixed sequence of calls and prints one JSON object per call on
stdout: {"step": NAME, "ok": bool, "took_ms": F, "value": ..., "type": ..., "error": ...,
"errno": N}. A call that does not answer within the timeout is {"ok": false, "timeout": true}.

Modes (HOST PORT TIMEOUT_S first):
  redis-drop     conn A: GET k (before), SET k v, then conn B: GET k
  redis-reset    conn A: PING, EVAL "return 1" 0, then conn B: PING
  redis-pipeline conn A: one segment "GET a; SET p v", then one segment "SET q v; GET a"
  redis-split    raw socket: SET s v sent as two segments cut inside the name "SE|T", then
                 GET s on a fresh raw socket
  pg-drop        conn A: SELECT 1, /* comment */ insert ..., then conn B: SELECT 1
  redis-delay    conn A: COUNT rounds of GET k then SET k v, each timed (ms): [[GETs], [SETs]]
  pg-lose-reply  conn A: INSERT 7 in a transaction, COMMIT, then conn B: count the rows of 7
"""

import errno as errno_names
import json
import socket
import sys
import threading
import time


def os_error(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def report(step, call, timeout):
    """Runs call() in a thread; reports its value, its error, or that it did not answer."""
    result = {}

    def run():
        try:
            result["value"] = call()
        except Exception as exc:  # noqa: BLE001 - every failure is reported
            result["exc"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    took = (time.monotonic() - started) * 1000
    out = {"step": step, "took_ms": took}
    if thread.is_alive():
        out.update(ok=False, timeout=True)
    elif "exc" in result:
        exc = result["exc"]
        cause = os_error(exc)
        number = cause.errno if cause else None
        out.update(
            ok=False,
            timeout=False,
            type=type(exc).__module__ + "." + type(exc).__name__,
            error=str(exc).strip()[:300],
            errno=number,
            errno_name=errno_names.errorcode.get(number) if number else None,
        )
    else:
        value = result["value"]
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        out.update(ok=True, value=value if isinstance(value, (str, int, list)) else repr(value))
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()


def redis_conn(host, port):
    import redis

    # No retries: a call that fails must say so, not be sent again.
    return redis.Redis(host=host, port=port, socket_timeout=None, retry_on_timeout=False,
                       retry=None, single_connection_client=True)


def raw(host, port):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_reply(s, count):
    """Reads until `count` CRLF-terminated simple replies arrived."""
    data = b""
    while data.count(b"\r\n") < count:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed after %r" % data)
        data += chunk
    return data


def main():
    mode, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    if mode == "redis-drop":
        a = redis_conn(host, port)
        report("get_before", lambda: a.get("k"), timeout)
        report("set", lambda: a.set("k", "v"), timeout)
        b = redis_conn(host, port)
        report("get_other", lambda: b.get("k"), timeout)
    elif mode == "redis-reset":
        a = redis_conn(host, port)
        report("ping", lambda: a.ping(), timeout)
        report("eval", lambda: a.eval("return 1", 0), timeout)
        b = redis_conn(host, port)
        report("ping_other", lambda: b.ping(), timeout)
    elif mode == "redis-pipeline":
        s = raw(host, port)
        s.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n*3\r\n$3\r\nSET\r\n$1\r\np\r\n$1\r\nv\r\n")
        report("get_then_set", lambda: read_reply(s, 2), timeout)
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nq\r\n$1\r\nv\r\n*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
        report("set_then_get", lambda: read_reply(s, 1), timeout)
    elif mode == "redis-split":
        s = raw(host, port)
        s.sendall(b"*3\r\n$3\r\nSE")
        time.sleep(0.05)
        s.sendall(b"T\r\n$1\r\ns\r\n$5\r\nsplit\r\n")
        report("split_set", lambda: read_reply(s, 1), timeout)
        t = raw(host, port)
        t.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\ns\r\n")
        report("get_split", lambda: read_reply(t, 2), timeout)
    elif mode == "pg-drop":
        import psycopg

        conninfo = f"host={host} port={port} user=postgres dbname=postgres connect_timeout=5"
        a = psycopg.connect(conninfo, autocommit=True)
        report("select_before", lambda: a.execute("SELECT 1").fetchone()[0], timeout)
        report("insert",
               lambda: a.execute("/* app */ -- why\n  insert into t values (1)").rowcount,
               timeout)
        b = psycopg.connect(conninfo, autocommit=True)
        report("select_other", lambda: b.execute("SELECT count(*) FROM t").fetchone()[0],
               timeout)
    elif mode == "redis-delay":
        a = redis_conn(host, port)
        a.ping()

        def rounds():
            gets, sets = [], []
            for _ in range(int(sys.argv[5])):
                started = time.perf_counter()
                a.get("k")
                gets.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                a.set("k", "v")
                sets.append((time.perf_counter() - started) * 1000)
            return [gets, sets]

        report("rounds", rounds, timeout)
    elif mode == "pg-lose-reply":
        import psycopg

        conninfo = f"host={host} port={port} user=postgres dbname=postgres connect_timeout=5"
        a = psycopg.connect(conninfo)
        report("insert", lambda: a.execute("insert into t values (7)").rowcount, timeout)
        report("commit", lambda: a.commit(), timeout)
        b = psycopg.connect(conninfo, autocommit=True)
        report("count", lambda: b.execute("select count(*) from t where id = 7").fetchone()[0],
               timeout)
    else:
        sys.exit(f"unknown mode {mode}")
    sys.stdout.flush()
    # Calls left hanging on dropped requests must not keep the process alive.
    import os

    os._exit(0)


if __name__ == "__main__":
    main()
