#!/usr/bin/env python3
"""The demo app of faultd's experiments, and the tools its experiments measure it with.

  serve          An HTTP service that reads items from PostgreSQL (the source of truth), caches
                 them in Redis and falls back to memory when Redis or PostgreSQL fail. A traffic
                 thread plays its users: it calls the service over HTTP and records each
                 answer (status, latency, where the item came from).
                 It also runs a job queue on Redis (POST /jobs, GET /jobs): see jobqueue.py.
  stats          Error rate and latency of the users' calls over the last N seconds; exits 1
                 when they break the thresholds (the experiments' steady state).
  wait-healthy   Waits until the service reads from Redis (or PostgreSQL) again; exits 1 if it
                 does not within the limit.
  writer         Numbered writes to Redis (MULTI/EXEC of a record and its index entry), retried
                 until acknowledged, for a while; the acknowledged ones go to a ledger.
  verify-writes  Every acknowledged write is in Redis, whole; no write is half there.
  bank           Transfers between two accounts through a small PostgreSQL connection pool that
                 reconnects; each transaction's outcome (committed, failed, unknown) goes to a
                 ledger.
  verify-bank    Every transaction reported committed is in the database, none reported failed
                 is, the balances add up, and the pool committed again after the failures.

Processes that must be inside the workload join a cgroup v2 (--cgroup /PATH) themselves.
Needs redis-py and psycopg 3.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jobqueue

DEFAULT_PG = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def cgroup2_root():
    """Where cgroup v2 is mounted: /sys/fs/cgroup (unified) or e.g. /sys/fs/cgroup/unified
    (hybrid), as faultd resolves cgroup paths."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] == "cgroup2":
                return fields[4]
    raise SystemExit("no cgroup v2 mount in /proc/self/mountinfo: faultd needs cgroup v2")


def join_cgroup(path):
    """Move this process into the cgroup v2 `path` (relative to the root), creating it."""
    if not path:
        return
    directory = os.path.join(cgroup2_root(), path.strip("/"))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def redis_client(addr, timeout):
    import redis

    host, _, port = addr.rpartition(":")
    return redis.Redis(
        host=host.strip("[]"),
        port=int(port),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry_on_timeout=False,
    )


def pg_connect(dsn, timeout):
    import psycopg

    return psycopg.connect(dsn, connect_timeout=max(1, int(round(timeout))), autocommit=False)


def emit(document, ok):
    print(json.dumps(document, sort_keys=True))
    sys.stdout.flush()
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# serve


class Breaker:
    """After `threshold` failures in a row (a timeout is one), skip the backend for `cooldown`
    seconds, then let one request try it again."""

    def __init__(self, threshold=1, cooldown=1.0):
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0
        self.lock = threading.Lock()

    def allow(self):
        with self.lock:
            return time.monotonic() >= self.open_until

    def ok(self):
        with self.lock:
            self.failures = 0
            self.open_until = 0.0

    def failed(self):
        with self.lock:
            self.failures += 1
            if self.failures >= self.threshold:
                self.open_until = time.monotonic() + self.cooldown


class Service:
    """Each backend call runs under a budget (--redis-timeout, --pg-timeout): a call that
    overruns it counts as failed and the request moves on, so one user request takes at most
    the two budgets together, whatever the network does."""

    def __init__(self, args):
        self.args = args
        self.memory = {}
        self.redis_breaker = Breaker()
        self.pg_breaker = Breaker()
        # One client (redis-py pools its connections) and a pool of PostgreSQL connections,
        # shared by the request threads.
        self.redis = redis_client(args.redis, args.redis_timeout)
        self.pg_idle = deque()
        self.pg_lock = threading.Lock()
        self.calls = ThreadPoolExecutor(max_workers=32, thread_name_prefix="backend")
        self.seed()

    def seed(self):
        with pg_connect(self.args.postgres, 5) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS demo_items (key text PRIMARY KEY, value text)")
            for i in range(self.args.keys):
                conn.execute(
                    "INSERT INTO demo_items VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (f"item-{i}", f"value of item {i}"),
                )
            conn.commit()

    def within(self, budget, call, *args):
        return self.calls.submit(call, *args).result(timeout=budget)

    def pg_select(self, key, query="SELECT value FROM demo_items WHERE key = %s"):
        with self.pg_lock:
            conn = self.pg_idle.popleft() if self.pg_idle else None
        try:
            if conn is None:
                conn = pg_connect(self.args.postgres, self.args.pg_timeout)
                conn.autocommit = True
            row = conn.execute(query, (key,) if key is not None else None).fetchone()
        except Exception:
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
            raise
        with self.pg_lock:
            self.pg_idle.append(conn)
        return row

    def item(self, key):
        """(value, source) or (None, None): Redis, else PostgreSQL (then cached), else memory."""
        redis_failed = False
        if self.redis_breaker.allow():
            try:
                value = self.within(self.args.redis_timeout, self.redis.get, f"demo:{key}")
                self.redis_breaker.ok()
                if value is not None:
                    value = value.decode()
                    self.memory[key] = value
                    return value, "redis"
            except Exception:
                self.redis_breaker.failed()
                redis_failed = True
        if self.pg_breaker.allow():
            try:
                row = self.within(self.args.pg_timeout, self.pg_select, key)
                self.pg_breaker.ok()
                if row is not None:
                    value = row[0]
                    self.memory[key] = value
                    # Refill the cache in the background, unless Redis just failed.
                    if not redis_failed and self.redis_breaker.allow():
                        self.calls.submit(self.cache, key, value)
                    return value, "postgres"
            except Exception:
                self.pg_breaker.failed()
        if key in self.memory:
            return self.memory[key], "memory"
        return None, None

    def cache(self, key, value):
        try:
            self.redis.set(f"demo:{key}", value, ex=self.args.cache_ttl)
        except Exception:
            self.redis_breaker.failed()

    def health(self):
        """Whether the app reaches each backend now (a PING and a SELECT 1 within budget)."""
        checks = (
            ("redis", self.redis_breaker, self.args.redis_timeout, self.redis.ping, ()),
            ("postgres", self.pg_breaker, self.args.pg_timeout, self.pg_select, (None, "SELECT 1")),
        )
        result = {}
        for name, breaker, budget, check, args in checks:
            try:
                self.within(budget, check, *args)
                breaker.ok()
                result[name] = "ok"
            except Exception:
                breaker.failed()
                result[name] = "down"
        return result


class Traffic:
    """The app's users: `users` threads making `rps` calls a second together over HTTP, each
    call recorded for `stats`."""

    def __init__(self, port, rps, keys, timeout, users=4):
        self.port = port
        self.rps = rps / users
        self.users = users
        self.counter = 0
        self.keys = keys
        self.timeout = timeout
        self.records = deque(maxlen=200_000)
        self.lock = threading.Lock()

    def start(self):
        for n in range(self.users):
            threading.Thread(target=self.user, name=f"user-{n}", daemon=True).start()

    def user(self):
        interval = 1.0 / self.rps
        next_at = time.monotonic()
        while True:
            with self.lock:
                self.counter += 1
                key = f"item-{self.counter % self.keys}"
            start = time.monotonic()
            ok, source = False, None
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                conn.request("GET", f"/item/{key}")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                ok = response.status == 200
                if ok:
                    source = json.loads(body).get("source")
            except Exception:
                ok = False
            latency = time.monotonic() - start
            if latency > self.timeout:
                ok = False
            with self.lock:
                self.records.append((time.time(), ok, latency, source))
            next_at = max(next_at + interval, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))

    def stats(self, window, until=None):
        until = until or time.time()
        since = until - window
        with self.lock:
            recent = [r for r in self.records if since <= r[0] < until]
        latencies = sorted(r[2] for r in recent)
        errors = sum(1 for r in recent if not r[1])
        sources = {}
        for r in recent:
            name = r[3] or "error"
            sources[name] = sources.get(name, 0) + 1

        def quantile(q):
            if not latencies:
                return None
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

        return {
            "window_s": window,
            "requests": len(recent),
            "errors": errors,
            "error_rate": errors / len(recent) if recent else None,
            "p50_s": quantile(0.50),
            "p99_s": quantile(0.99),
            "max_s": latencies[-1] if latencies else None,
            "sources": sources,
        }


def serve(args):
    join_cgroup(args.cgroup)
    service = Service(args)
    jobs = jobqueue.JobQueue(args, sys.modules[__name__])
    jobs.start()
    traffic = Traffic(args.port, args.traffic_rps, args.keys, args.user_timeout)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):
            pass

        def answer(self, status, document):
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            if url.path.startswith("/item/"):
                key = url.path[len("/item/") :]
                value, source = service.item(key)
                if value is None:
                    self.answer(503, {"key": key, "error": "no backend answered"})
                else:
                    self.answer(200, {"key": key, "value": value, "source": source})
            elif url.path == "/jobs":
                self.answer(200, jobs.stats())
            elif url.path == "/health":
                self.answer(200, service.health())
            elif url.path == "/stats":
                query = urllib.parse.parse_qs(url.query)
                window = float(query.get("window", ["10"])[0])
                until = float(query["until"][0]) if "until" in query else None
                self.answer(200, traffic.stats(window, until))
            else:
                self.answer(404, {"error": "unknown path"})

        def do_POST(self):
            if self.path != "/jobs":
                return self.answer(404, {"error": "unknown path"})
            self.answer(*jobs.submit_body(self.rfile.read(int(self.headers.get("Content-Length", 0)))))

    class Server(ThreadingHTTPServer):
        # Users, job producers and health pollers connect at once: the default backlog of 5
        # overflows, and a dropped SYN costs its client a 1 s retransmission.
        request_queue_size = 128

    server = Server(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    print(json.dumps({"serving": f"http://127.0.0.1:{args.port}", "pid": os.getpid()}), flush=True)
    if args.traffic_rps > 0:
        traffic.start()
    server.serve_forever()


# ---------------------------------------------------------------------------------------------
# stats, wait-healthy


def get_json(url, path, timeout=5.0):
    parsed = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=timeout)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return json.loads(body)


def stats(args):
    document = get_json(args.url, f"/stats?window={args.window}")
    problems = []
    if document["requests"] < args.min_requests:
        problems.append(f"only {document['requests']} requests in {args.window} s")
    if document["error_rate"] is not None and document["error_rate"] > args.max_error_rate:
        problems.append(f"error rate {document['error_rate']:.3f} > {args.max_error_rate}")
    if args.max_p99 is not None and document["p99_s"] is not None and document["p99_s"] > args.max_p99:
        problems.append(f"p99 {document['p99_s']:.3f} s > {args.max_p99} s")
    document["problems"] = problems
    return emit(document, not problems)


def wait_healthy(args):
    start = time.monotonic()
    last = None
    while time.monotonic() - start <= args.within:
        try:
            last = get_json(args.url, "/health", timeout=2.0)
            if last.get(args.backend) == "ok":
                return emit(
                    {"backend": args.backend, "healthy_after_s": round(time.monotonic() - start, 3)},
                    True,
                )
        except Exception as err:
            last = {"error": str(err)}
        time.sleep(0.1)
    return emit({"backend": args.backend, "healthy_after_s": None, "last": last}, False)


# ---------------------------------------------------------------------------------------------
# writer, verify-writes


def record_value(prefix, i):
    digest = hashlib.sha256(f"{prefix}:{i}".encode()).hexdigest()
    return f"{i}:{digest}:" + "x" * 256


def writer(args):
    join_cgroup(args.cgroup)
    client = redis_client(args.redis, args.timeout)
    for key in client.scan_iter(f"{args.prefix}:*"):
        client.delete(key)
    ledger = open(args.ledger, "w")
    end = time.monotonic() + args.seconds
    i = attempts = failures = 0
    while time.monotonic() < end:
        i += 1
        value = record_value(args.prefix, i)
        acked = False
        while not acked:
            attempts += 1
            try:
                pipe = client.pipeline(transaction=True)
                pipe.set(f"{args.prefix}:rec:{i}", value)
                pipe.hset(f"{args.prefix}:idx", str(i), hashlib.sha256(value.encode()).hexdigest())
                pipe.execute()
                acked = True
            except Exception as err:
                # Unknown whether it got in: the writes are idempotent, so retry the same ones.
                failures += 1
                entry = {"retry": i, "error": type(err).__name__, "t": time.time()}
                ledger.write(json.dumps(entry) + "\n")
                ledger.flush()
                if time.monotonic() >= end + args.drain:
                    break
                time.sleep(args.backoff)
        if not acked:
            ledger.write(json.dumps({"gave_up": i, "t": time.time()}) + "\n")
            break
        ledger.write(json.dumps({"acked": i, "t": time.time()}) + "\n")
        ledger.flush()
    ledger.close()
    return emit({"written": i, "attempts": attempts, "failed_attempts": failures}, True)


def read_ledger(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return None


def verify_writes(args):
    entries = read_ledger(args.ledger)
    if entries is None:
        return emit({"acked": 0, "note": f"no ledger at {args.ledger} yet"}, True)
    acked = [e["acked"] for e in entries if "acked" in e]
    retries = [e for e in entries if "retry" in e]
    client = redis_client(args.redis, 5.0)
    index = {k.decode(): v.decode() for k, v in client.hgetall(f"{args.prefix}:idx").items()}
    records = {}
    keys = list(client.scan_iter(f"{args.prefix}:rec:*", count=1000))
    for start in range(0, len(keys), 1000):
        batch = keys[start : start + 1000]
        for key, value in zip(batch, client.mget(batch)):
            if value is not None:
                records[key.decode().rsplit(":", 1)[1]] = value.decode()
    missing = [i for i in acked if str(i) not in records or str(i) not in index]
    partial = sorted(
        int(i)
        for i in set(records) ^ set(index)
    )
    corrupt = sorted(
        int(i)
        for i, value in records.items()
        if value != record_value(args.prefix, int(i))
        or index.get(i) not in (None, hashlib.sha256(value.encode()).hexdigest())
    )
    document = {
        "acked": len(acked),
        "present": len(records),
        "failed_attempts": len(retries),
        "missing_acked": missing[:20],
        "partial": partial[:20],
        "corrupt": corrupt[:20],
        "acked_after_failures": sum(1 for e in entries if "acked" in e and retries and e["t"] > retries[-1]["t"]),
    }
    return emit(document, not missing and not partial and not corrupt)


# ---------------------------------------------------------------------------------------------
# bank, verify-bank


class Pool:
    """A few PostgreSQL connections; a broken one is thrown away and replaced on next use."""

    def __init__(self, dsn, size, timeout):
        self.dsn = dsn
        self.timeout = timeout
        self.idle = deque()
        self.size = size
        self.lock = threading.Lock()
        self.reconnects = 0
        self.opened = 0

    def get(self):
        with self.lock:
            if self.idle:
                return self.idle.popleft()
            self.opened += 1
            if self.opened > self.size:
                self.reconnects += 1
        return pg_connect(self.dsn, self.timeout)

    def put(self, conn):
        with self.lock:
            self.idle.append(conn)

    def discard(self, conn):
        try:
            conn.close()
        except Exception:
            pass


def bank_schema(dsn):
    with pg_connect(dsn, 5) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS demo_accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS demo_transfers (id text PRIMARY KEY, run text NOT NULL, amount bigint NOT NULL)")
        conn.execute("INSERT INTO demo_accounts VALUES (1, 1000000), (2, 1000000) ON CONFLICT DO NOTHING")
        conn.commit()


def bank(args):
    join_cgroup(args.cgroup)
    bank_schema(args.postgres)
    pool = Pool(args.postgres, args.pool, args.timeout)
    ledger = open(args.ledger, "w")
    lock = threading.Lock()
    end = time.monotonic() + args.seconds
    run = f"{os.getpid()}-{int(time.time())}"
    counts = {"committed": 0, "failed": 0, "unknown": 0}

    def write(entry):
        with lock:
            counts[entry["outcome"]] += 1
            ledger.write(json.dumps(entry) + "\n")
            ledger.flush()

    def worker(n):
        seq = 0
        while time.monotonic() < end:
            seq += 1
            txn = f"{run}-{n}-{seq}"
            amount = random.randint(1, 100)
            try:
                conn = pool.get()
            except Exception as err:
                write({"id": txn, "outcome": "failed", "stage": "connect", "error": type(err).__name__, "t": time.time()})
                time.sleep(args.backoff)
                continue
            stage = "statements"
            try:
                conn.execute("INSERT INTO demo_transfers VALUES (%s, %s, %s)", (txn, run, amount))
                conn.execute("UPDATE demo_accounts SET balance = balance - %s WHERE id = 1", (amount,))
                conn.execute("UPDATE demo_accounts SET balance = balance + %s WHERE id = 2", (amount,))
                stage = "commit"
                conn.commit()
                write({"id": txn, "outcome": "committed", "t": time.time()})
                pool.put(conn)
            except Exception as err:
                # Before COMMIT was sent the server rolls back; during it, the outcome is unknown.
                outcome = "unknown" if stage == "commit" else "failed"
                write({"id": txn, "outcome": outcome, "stage": stage, "error": type(err).__name__, "t": time.time()})
                pool.discard(conn)
                time.sleep(args.backoff)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(args.pool)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.write(json.dumps({"run": run, "reconnects": pool.reconnects}) + "\n")
    ledger.close()
    counts.update({"run": run, "reconnects": pool.reconnects})
    return emit(counts, True)


def verify_bank(args):
    entries = read_ledger(args.ledger)
    if entries is None:
        return emit({"committed": 0, "note": f"no ledger at {args.ledger} yet"}, True)
    runs = [e for e in entries if "run" in e]
    txns = [e for e in entries if "outcome" in e]
    committed = {e["id"] for e in txns if e["outcome"] == "committed"}
    failed = {e["id"] for e in txns if e["outcome"] == "failed"}
    unknown = {e["id"] for e in txns if e["outcome"] == "unknown"}
    problems = []
    if not runs:
        problems.append("the ledger has no end record: the bank run did not finish")
    with pg_connect(args.postgres, 5) as conn:
        if runs:
            present = {
                row[0]
                for row in conn.execute("SELECT id FROM demo_transfers WHERE run = %s", (runs[-1]["run"],))
            }
        else:
            present = set()
        total = conn.execute("SELECT sum(balance) FROM demo_accounts").fetchone()[0]
    lost = sorted(committed - present)
    failed_but_committed = sorted(failed & present)
    unreported = sorted(present - committed - unknown)
    if lost:
        problems.append(f"{len(lost)} transactions reported committed are missing")
    if failed_but_committed:
        problems.append(f"{len(failed_but_committed)} transactions reported failed were committed")
    if unreported:
        problems.append(f"{len(unreported)} transactions in the database were never reported")
    if total != 2000000:
        problems.append(f"balances add up to {total}, not 2000000")
    last_failure = max((e["t"] for e in txns if e["outcome"] != "committed"), default=None)
    committed_after = sum(1 for e in txns if e["outcome"] == "committed" and last_failure and e["t"] > last_failure)
    if last_failure is not None and committed_after == 0:
        problems.append("the pool did not commit again after the failures")
    document = {
        "committed": len(committed),
        "failed": len(failed),
        "unknown": len(unknown),
        "unknown_committed": len(unknown & present),
        "committed_after_last_failure": committed_after,
        "reconnects": runs[-1]["reconnects"] if runs else None,
        "problems": problems,
    }
    return emit(document, not problems)


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--redis", default="127.0.0.1:6379")
    p.add_argument("--postgres", default=DEFAULT_PG)
    p.add_argument("--cgroup", help="join this cgroup v2 (path under /sys/fs/cgroup) first")
    p.add_argument("--keys", type=int, default=50)
    p.add_argument("--cache-ttl", type=int, default=3600)
    p.add_argument("--redis-timeout", type=float, default=1.0)
    p.add_argument("--pg-timeout", type=float, default=0.5)
    p.add_argument("--traffic-rps", type=float, default=20.0, help="the users' calls a second (0: none)")
    p.add_argument("--user-timeout", type=float, default=2.0, help="a call slower than this is an error")
    p.set_defaults(func=serve)
    jobqueue.add_commands(sub, sys.modules[__name__])

    p = sub.add_parser("stats")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--max-error-rate", type=float, default=0.05)
    p.add_argument("--max-p99", type=float)
    p.add_argument("--min-requests", type=int, default=1)
    p.set_defaults(func=stats)

    p = sub.add_parser("wait-healthy")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--backend", choices=["redis", "postgres"], default="redis")
    p.add_argument("--within", type=float, default=30.0)
    p.set_defaults(func=wait_healthy)

    p = sub.add_parser("writer")
    p.add_argument("--redis", default="127.0.0.1:6379")
    p.add_argument("--cgroup")
    p.add_argument("--prefix", default="demo-writes")
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--drain", type=float, default=30.0, help="how long past --seconds to keep retrying the last write")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--backoff", type=float, default=0.1)
    p.add_argument("--ledger", default="/tmp/faultd-demo-writes.jsonl")
    p.set_defaults(func=writer)

    p = sub.add_parser("verify-writes")
    p.add_argument("--redis", default="127.0.0.1:6379")
    p.add_argument("--prefix", default="demo-writes")
    p.add_argument("--ledger", default="/tmp/faultd-demo-writes.jsonl")
    p.set_defaults(func=verify_writes)

    p = sub.add_parser("bank")
    p.add_argument("--postgres", default=DEFAULT_PG)
    p.add_argument("--cgroup")
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--backoff", type=float, default=0.1)
    p.add_argument("--ledger", default="/tmp/faultd-demo-bank.jsonl")
    p.set_defaults(func=bank)

    p = sub.add_parser("verify-bank")
    p.add_argument("--postgres", default=DEFAULT_PG)
    p.add_argument("--ledger", default="/tmp/faultd-demo-bank.jsonl")
    p.set_defaults(func=verify_bank)

    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
