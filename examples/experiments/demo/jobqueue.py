"""The demo app's job queue, and the tools its experiments measure it with.

The queue lives in Redis (a list); when Redis fails, submissions go to a bounded memory buffer
that a flusher moves to Redis once it answers again, and a full buffer answers 503. Workers
move each job to a processing list of their own while they work on it (so a job is never
dropped by a worker that loses Redis midway: it goes back to the queue), and do its work in
one PostgreSQL transaction guarded by the job's id, so a job delivered twice is done once.
A job that fails `--job-attempts` times goes to a dead-letter list.

  jobs-load     The job producers: submit jobs at a rate over HTTP for a while, poll /health,
                and write every answer to a ledger.
  verify-jobs   From that ledger: every accepted job done exactly once (or dead-lettered, for
                the poison ones), none answered 503 done, 503 only while the buffer was full,
                Redis reported unhealthy soon enough, and the backlog drained within the RTO.
"""

import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

QUEUE = "demo:jobs"
DEAD = "demo:jobs:dead"
ATTEMPTS = "demo:jobs:attempts"
DEAD_IDS = "demo:jobs:dead:ids"
# Dead-lettering, once per job even when the job was delivered twice (a push retried after its
# reply was lost): the id goes into a set, the job into the list only if the id was new, and
# out of the worker's processing list, all atomically.
DEAD_LETTER = """
if redis.call('SADD', KEYS[3], ARGV[2]) == 1 then redis.call('LPUSH', KEYS[2], ARGV[3]) end
redis.call('LREM', KEYS[1], 1, ARGV[1])
"""


class JobFailed(Exception):
    """The job itself failed (not Redis, not PostgreSQL): it counts towards dead-lettering."""


class JobQueue:
    def __init__(self, args, app):
        self.args = args
        self.app = app
        self.limit = args.job_buffer
        self.buffer = deque()
        self.lock = threading.Lock()
        self.breaker = app.Breaker()
        self.redis = app.redis_client(args.redis, args.redis_timeout)
        self.calls = ThreadPoolExecutor(max_workers=8, thread_name_prefix="jobs")
        self.counts = {
            "to_redis": 0,
            "to_memory": 0,
            "rejected": 0,
            "flushed": 0,
            "done": 0,
            "duplicates_skipped": 0,
            "retried": 0,
            "dead_lettered": 0,
            "requeued_after_failure": 0,
        }
        with app.pg_connect(args.postgres, 5) as conn:
            # demo_jobs_done is the idempotency guard; demo_job_runs records each time a job's
            # work really ran (no key on purpose: the check counts them).
            conn.execute("CREATE TABLE IF NOT EXISTS demo_jobs_done (job text PRIMARY KEY, done_at double precision NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS demo_job_runs (job text NOT NULL, worker text NOT NULL, at double precision NOT NULL)")
            conn.commit()

    def start(self):
        threading.Thread(target=self.flusher, name="jobs-flusher", daemon=True).start()
        for n in range(self.args.workers):
            threading.Thread(target=self.worker, args=(n,), name=f"jobs-worker-{n}", daemon=True).start()

    def count(self, name, n=1):
        with self.lock:
            self.counts[name] += n

    def stats(self):
        with self.lock:
            return dict(self.counts, buffered=len(self.buffer), limit=self.limit)

    def submit_body(self, body):
        """POST /jobs: the body is a JSON object with a string `id`."""
        try:
            job = json.loads(body)
            if not isinstance(job.get("id"), str) or not job["id"]:
                raise ValueError
        except (ValueError, AttributeError):
            return 400, {"error": "body: a JSON object with a non-empty string id"}
        return self.submit(job)

    def submit(self, job):
        """(HTTP status, answer): 202 once the job is in Redis or in the buffer, 503 when Redis
        failed and the buffer is full."""
        raw = json.dumps(job, sort_keys=True)
        if self.breaker.allow():
            try:
                self.calls.submit(self.redis.lpush, QUEUE, raw).result(timeout=self.args.redis_timeout)
                self.breaker.ok()
                self.count("to_redis")
                return 202, {"id": job["id"], "queued": "redis"}
            except Exception:
                # The push may still land after the budget ran out: then the job is both in
                # Redis and in the buffer, and the workers' guard does it once.
                self.breaker.failed()
        with self.lock:
            buffered = len(self.buffer)
            if buffered >= self.limit:
                self.counts["rejected"] += 1
                return 503, {"id": job["id"], "error": "Redis is unavailable and the job buffer is full", "buffered": buffered, "limit": self.limit}
            self.buffer.append(raw)
            self.counts["to_memory"] += 1
            return 202, {"id": job["id"], "queued": "memory", "buffered": buffered + 1, "limit": self.limit}

    def flusher(self):
        """Moves buffered jobs to Redis, oldest first, as soon as Redis takes them."""
        while True:
            with self.lock:
                raw = self.buffer[0] if self.buffer else None
            if raw is None or not self.breaker.allow():
                time.sleep(0.05)
                continue
            try:
                self.calls.submit(self.redis.lpush, QUEUE, raw).result(timeout=self.args.redis_timeout)
                self.breaker.ok()
                with self.lock:
                    self.buffer.popleft()
                    self.counts["flushed"] += 1
            except Exception:
                self.breaker.failed()
                time.sleep(0.1)

    def worker(self, n):
        name = f"{os.getpid()}:{n}"
        processing = f"demo:jobs:processing:{name}"
        # BLMOVE waits 0.5 s: the socket's budget must cover it.
        redis = self.app.redis_client(self.args.redis, 2.0)
        dead_letter = redis.register_script(DEAD_LETTER)
        pg = None
        recover = True
        while True:
            try:
                if recover:
                    # Jobs this worker held when Redis or PostgreSQL failed go back to the queue.
                    while redis.lmove(processing, QUEUE, "LEFT", "RIGHT") is not None:
                        self.count("requeued_after_failure")
                    recover = False
                raw = redis.blmove(QUEUE, processing, 0.5, "RIGHT", "LEFT")
                if raw is None:
                    continue
                job = json.loads(raw)
                try:
                    if pg is None:
                        pg = self.app.pg_connect(self.args.postgres, 2.0)
                    outcome = self.work(pg, job, name)
                except JobFailed:
                    attempts = redis.hincrby(ATTEMPTS, job["id"], 1)
                    if attempts >= self.args.job_attempts:
                        letter = json.dumps(dict(job, dead_at=time.time(), attempts=attempts))
                        dead_letter(keys=[processing, DEAD, DEAD_IDS], args=[raw, job["id"], letter])
                        self.count("dead_lettered")
                    else:
                        pipe = redis.pipeline(transaction=True)
                        pipe.lrem(processing, 1, raw)
                        pipe.lpush(QUEUE, raw)
                        pipe.execute()
                        self.count("retried")
                    continue
                except Exception:
                    # PostgreSQL failed: the job stays in the processing list and goes back.
                    if pg is not None:
                        try:
                            pg.close()
                        except Exception:
                            pass
                    pg = None
                    recover = True
                    time.sleep(0.2)
                    continue
                self.count(outcome)
                redis.lrem(processing, 1, raw)
            except Exception:
                recover = True
                time.sleep(0.2)

    def work(self, pg, job, worker):
        """The job's work, once: the guard row and the work commit together or not at all."""
        if job.get("poison"):
            raise JobFailed(job["id"])
        time.sleep(self.args.job_work)
        first = pg.execute(
            "INSERT INTO demo_jobs_done (job, done_at) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING job",
            (job["id"], time.time()),
        ).fetchone()
        if first is None:
            pg.rollback()
            return "duplicates_skipped"
        pg.execute("INSERT INTO demo_job_runs (job, worker, at) VALUES (%s, %s, %s)", (job["id"], worker, time.time()))
        pg.commit()
        return "done"


# ---------------------------------------------------------------------------------------------
# jobs-load


def process_start_time():
    """When this process was started (wall clock), from /proc: `chaos run` starts the load and
    the fault's pause together, so the fault's start is this plus the warm-up."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def jobs_load(args, app):
    import http.client
    import urllib.parse

    start = process_start_time()
    header = {
        "run": f"{os.getpid()}-{int(start)}",
        "start": start,
        "fault_at": start + args.warmup,
        "fault_end": start + args.warmup + args.fault_seconds * args.phases,
        "phase_seconds": args.fault_seconds,
        "phases": args.phases,
    }
    end = header["fault_end"] + args.tail
    ledger = open(args.ledger, "w")
    lock = threading.Lock()
    counter = [0]
    outcomes = {}
    payload = "x" * args.payload_bytes
    url = urllib.parse.urlparse(args.url)

    def write(entry):
        with lock:
            ledger.write(json.dumps(entry) + "\n")
            ledger.flush()

    write(header)

    def producer():
        interval = args.producers / args.rate
        next_at = time.monotonic()
        while time.time() < end:
            with lock:
                counter[0] += 1
                seq = counter[0]
            job = {"id": f"{header['run']}-{seq}", "payload": payload}
            if args.poison_every and seq % args.poison_every == 0:
                job["poison"] = True
            sent = time.time()
            entry = {"t": sent, "job": job["id"], "poison": bool(job.get("poison"))}
            try:
                conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=args.timeout)
                conn.request("POST", "/jobs", body=json.dumps(job), headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                body = json.loads(response.read() or b"{}")
                conn.close()
                entry.update(status=response.status, answer=body)
            except Exception as err:
                entry["status"] = f"error:{type(err).__name__}"
            entry["latency"] = time.time() - sent
            write(entry)
            with lock:
                outcomes[str(entry["status"])] = outcomes.get(str(entry["status"]), 0) + 1
            next_at = max(next_at + interval, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))

    def health():
        while time.time() < end:
            try:
                write({"t_health": time.time(), "health": app.get_json(args.url, "/health", timeout=5.0)})
            except Exception as err:
                write({"t_health": time.time(), "health": {"error": type(err).__name__}})
            time.sleep(args.health_every)

    threads = [threading.Thread(target=producer) for _ in range(args.producers)]
    threads.append(threading.Thread(target=health))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    return app.emit({"run": header["run"], "submitted": counter[0], "answers": outcomes}, True)


# ---------------------------------------------------------------------------------------------
# verify-jobs


def jobs_state(app, args, run):
    """Per job of `run`: how many times its work ran and when it was done; the dead letters."""
    with app.pg_connect(args.postgres, 5) as conn:
        runs = {
            job: (count, done_at)
            for job, count, done_at in conn.execute(
                "SELECT r.job, count(*), max(d.done_at) FROM demo_job_runs r LEFT JOIN demo_jobs_done d USING (job) "
                "WHERE r.job LIKE %s GROUP BY r.job",
                (f"{run}-%",),
            )
        }
    redis = app.redis_client(args.redis, 5.0)
    dead = {}
    for raw in redis.lrange(DEAD, 0, -1):
        job = json.loads(raw)
        if job["id"].startswith(f"{run}-"):
            dead.setdefault(job["id"], []).append(job["dead_at"])
    return runs, dead


def quantile(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


def by_phase(app, url, header, subs, runs):
    """Submissions (errors, p99), jobs (p99 from submission to done) and the app's users
    (calls, errors, p99) before the faults, during each phase, and after them until now."""
    names = ["before"] + [f"phase-{n + 1}" for n in range(header.get("phases", 1))] + ["after"]
    groups = {name: [] for name in names}
    for e in subs:
        n = int((e["t"] - header["fault_at"]) // header.get("phase_seconds", 1e9)) + 1
        groups[names[max(0, min(n, len(names) - 1))]].append(e)

    def users(n):
        phase = header.get("phase_seconds", 0)
        if n == 0:
            start, end = header["start"], header["fault_at"]
        elif n == len(names) - 1:
            start, end = header["fault_end"], time.time()
        else:
            start, end = header["fault_at"] + (n - 1) * phase, header["fault_at"] + n * phase
        try:
            stats = app.get_json(url, f"/stats?window={end - start}&until={end}")
            p99 = stats["p99_s"]
            return {"calls": stats["requests"], "errors": stats["errors"], "p99_s": None if p99 is None else round(p99, 3)}
        except Exception as err:
            return {"error": type(err).__name__}

    return {
        name: {
            "users": users(n),
            "submitted": len(group),
            "errors": sum(1 for e in group if e["status"] != 202),
            "submit_p99_s": quantile([e["latency"] for e in group], 0.99),
            "job_p99_s": quantile([runs[e["job"]][1] - e["t"] for e in group if e["job"] in runs], 0.99),
        }
        for n, (name, group) in enumerate(groups.items())
        if group or name == "after"
    }


def verify_jobs(args, app):
    entries = app.read_ledger(args.ledger)
    if not entries:
        return app.emit({"accepted": 0, "note": f"no ledger at {args.ledger} yet"}, True)
    header = entries[0]
    subs = [e for e in entries if "job" in e]
    health = [e for e in entries if "health" in e]
    accepted = [e for e in subs if e["status"] == 202]
    rejected = [e for e in subs if e["status"] == 503]
    errors = [e for e in subs if e["status"] != 202]
    want_done = {e["job"] for e in accepted if not e["poison"]}
    want_dead = {e["job"] for e in accepted if e["poison"]}

    # Wait for the backlog, up to the RTO past the fault's end.
    deadline = header["fault_end"] + args.rto
    while True:
        runs, dead = jobs_state(app, args, header["run"])
        if (want_done <= set(runs) and want_dead <= set(dead)) or time.time() > deadline:
            break
        time.sleep(0.2)

    problems = []
    lost = sorted(want_done - set(runs)) + sorted(want_dead - set(dead))
    twice = sorted(job for job, (count, _) in runs.items() if count > 1)
    dead_twice = sorted(job for job, times in dead.items() if len(times) > 1)
    poison_done = sorted(job for job in runs if job in want_dead)
    rejected_done = sorted(e["job"] for e in rejected if e["job"] in runs or e["job"] in dead)
    not_full = [e for e in rejected if e.get("answer", {}).get("buffered", -1) < e.get("answer", {}).get("limit", 0)]
    over = [e for e in accepted if e.get("answer", {}).get("buffered", 0) > e.get("answer", {}).get("limit", 0)]
    finished = [t for job, (_, t) in runs.items() if job in want_done] + [min(dead[j]) for j in want_dead if j in dead]
    drained_after = max(finished) - header["fault_end"] if finished else None
    if lost:
        problems.append(f"{len(lost)} accepted jobs not done (or dead-lettered) {args.rto} s after the fault")
    if twice or dead_twice:
        problems.append(f"{len(twice) + len(dead_twice)} jobs done or dead-lettered twice")
    if poison_done:
        problems.append(f"{len(poison_done)} poison jobs reported done")
    if rejected_done:
        problems.append(f"{len(rejected_done)} jobs answered 503 were done anyway")
    if not_full:
        problems.append(f"{len(not_full)} submissions answered 503 while the buffer was not full")
    if over:
        problems.append(f"{len(over)} submissions buffered beyond the limit")
    if args.expect_full and not rejected:
        problems.append("the buffer never filled: nothing tested the 503")
    document = {
        "run": header["run"],
        "submitted": len(subs),
        "accepted": len(accepted),
        "accepted_into_memory": sum(1 for e in accepted if e.get("answer", {}).get("queued") == "memory"),
        "rejected_503": len(rejected),
        "other_errors": len(errors) - len(rejected),
        "done": sum(1 for job in runs if job in want_done),
        "dead_lettered": sum(1 for job in dead if job in want_dead),
        "lost": lost[:20],
        "done_twice": (twice + dead_twice)[:20],
        "drained_after_fault_s": None if drained_after is None else round(drained_after, 3),
        "rto_s": args.rto,
    }
    if not lost and drained_after is not None and drained_after > args.rto:
        problems.append(f"the backlog drained {drained_after:.1f} s after the fault: RTO is {args.rto} s")
    if args.unhealthy_within is not None:
        down = [e["t_health"] for e in health if e["t_health"] >= header["fault_at"] and e["health"].get("redis") != "ok"]
        after = round(down[0] - header["fault_at"], 3) if down else None
        document["redis_unhealthy_after_s"] = after
        if after is None or after > args.unhealthy_within:
            problems.append(f"health did not report Redis unhealthy within {args.unhealthy_within} s of the fault")
    if subs:
        latencies = sorted(e["latency"] for e in subs)
        document["submit_error_rate"] = round(len(errors) / len(subs), 4)
        document["submit_p99_s"] = round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
        if args.max_error_rate is not None and document["submit_error_rate"] > args.max_error_rate:
            problems.append(f"submission error rate {document['submit_error_rate']} > {args.max_error_rate}")
        if args.max_p99 is not None and document["submit_p99_s"] > args.max_p99:
            problems.append(f"submission p99 {document['submit_p99_s']} s > {args.max_p99} s")
    document["by_phase"] = by_phase(app, args.url, header, subs, runs)
    try:
        document["app"] = app.get_json(args.url, "/jobs")
    except Exception as err:
        document["app"] = {"error": type(err).__name__}
    document["problems"] = problems
    return app.emit(document, not problems)


def add_commands(sub, app):
    """The queue's options on `serve`, and its tools."""
    p = sub.choices["serve"]
    p.add_argument("--workers", type=int, default=2, help="job workers (0: none)")
    p.add_argument("--job-buffer", type=int, default=100, help="jobs held in memory while Redis fails")
    p.add_argument("--job-attempts", type=int, default=3, help="failures before a job is dead-lettered")
    p.add_argument("--job-work", type=float, default=0.01, help="seconds of work per job")

    p = sub.add_parser("jobs-load")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--rate", type=float, default=10.0, help="jobs submitted a second")
    p.add_argument("--producers", type=int, default=8)
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before the fault starts")
    p.add_argument("--fault-seconds", type=float, default=60.0)
    p.add_argument("--phases", type=int, default=1, help="faults of --fault-seconds one after the other")
    p.add_argument("--tail", type=float, default=0.0, help="seconds of load after the fault")
    p.add_argument("--poison-every", type=int, default=25, help="every Nth job fails (0: none)")
    p.add_argument("--payload-bytes", type=int, default=64)
    p.add_argument("--health-every", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--ledger", default="/tmp/faultd-demo-jobs.jsonl")
    p.set_defaults(func=lambda args: jobs_load(args, app))

    p = sub.add_parser("verify-jobs")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--redis", default="127.0.0.1:6379")
    p.add_argument("--postgres", default=app.DEFAULT_PG)
    p.add_argument("--ledger", default="/tmp/faultd-demo-jobs.jsonl")
    p.add_argument("--rto", type=float, default=30.0, help="seconds after the fault by which every accepted job is done")
    p.add_argument("--unhealthy-within", type=float, help="/health must report Redis down this soon after the fault")
    p.add_argument("--expect-full", action="store_true", help="the buffer must have filled (some 503s)")
    p.add_argument("--max-error-rate", type=float, help="of submissions (anything but 202)")
    p.add_argument("--max-p99", type=float, help="of submissions, seconds")
    p.set_defaults(func=lambda args: verify_jobs(args, app))
