"""The demo's payment service, for the ambiguous-commit experiment: it applies payments to
PostgreSQL and retries a payment whose COMMIT failed with a connection error, as payment code
commonly does. A lost COMMIT reply is ambiguous: the server may have committed. Whether a
retry then applies the payment twice depends on how the service retries:

  --retry naive        runs the payment's transaction again (a second row, a second debit)
  --retry idempotent   the payment carries its id; the retried transaction first checks
                       whether a payment of that id is already applied and, if so, stops

Commands (one JSON object on stdout; exit 1 when the check fails):
  payments.py pay --postgres DSN --cgroup /PATH --seconds S --ledger FILE [--retry MODE]
  payments.py verify --postgres DSN --ledger FILE
"""

import argparse
import json
import os
import sys
import time
import uuid

from app import join_cgroup  # the demo app's helper: the same cgroup rules for both

ACCOUNT_START = 1_000_000
# A payment is retried for up to RETRIES x RETRY_PAUSE (12 s): longer than the experiment's
# fault, so every payment ends applied.
RETRIES = 60
RETRY_PAUSE = 0.2


def connect(dsn, timeout=5):
    import psycopg

    return psycopg.connect(dsn, connect_timeout=timeout)


def create(conn):
    conn.execute(
        "CREATE TABLE IF NOT EXISTS demo_payments (payment_id text NOT NULL, amount int NOT NULL)"
    )
    conn.execute("CREATE TABLE IF NOT EXISTS demo_wallet (balance bigint NOT NULL)")


def setup(dsn):
    with connect(dsn) as conn:
        create(conn)
        conn.execute("TRUNCATE demo_payments")
        conn.execute("DELETE FROM demo_wallet")
        conn.execute("INSERT INTO demo_wallet VALUES (%s)", (ACCOUNT_START,))


class Already(Exception):
    """The payment is applied already: roll the check's transaction back."""


def apply(conn, payment_id, idempotent):
    """One attempt at the payment's transaction. Returns "applied" or "already"."""
    try:
        with conn.transaction():
            if idempotent:
                seen = conn.execute(
                    "SELECT 1 FROM demo_payments WHERE payment_id = %s", (payment_id,)
                ).fetchone()
                if seen:
                    raise Already()
            conn.execute("INSERT INTO demo_payments VALUES (%s, 1)", (payment_id,))
            conn.execute("UPDATE demo_wallet SET balance = balance - 1")
    except Already:
        return "already"
    return "applied"


def pay(args):
    import psycopg

    join_cgroup(args.cgroup)
    setup(args.postgres)
    idempotent = args.retry == "idempotent"
    ledger = open(args.ledger, "w")
    deadline = time.monotonic() + args.seconds
    conn = None
    counts = {"payments": 0, "retries": 0, "already_applied": 0, "gave_up": 0}
    while time.monotonic() < deadline:
        payment_id = str(uuid.uuid4())
        for attempt in range(RETRIES):
            try:
                if conn is None or conn.closed:
                    conn = connect(args.postgres)
                outcome = apply(conn, payment_id, idempotent)
                if outcome == "already":
                    counts["already_applied"] += 1
                break
            except psycopg.OperationalError as err:
                # The COMMIT's outcome is unknown: the payment is retried.
                counts["retries"] += 1
                ledger.write(json.dumps({"id": payment_id, "retry": attempt, "error": str(err)[:200]}) + "\n")
                ledger.flush()
                conn = None
                time.sleep(RETRY_PAUSE)
        else:
            counts["gave_up"] += 1
        counts["payments"] += 1
        ledger.write(json.dumps({"id": payment_id, "done": True}) + "\n")
        ledger.flush()
        time.sleep(0.02)
    print(json.dumps(counts))


def verify(args):
    with connect(args.postgres) as conn:
        create(conn)
        twice = conn.execute(
            "SELECT count(*) FROM (SELECT payment_id FROM demo_payments GROUP BY payment_id "
            "HAVING count(*) > 1) AS d"
        ).fetchone()[0]
        rows = conn.execute("SELECT count(*), count(DISTINCT payment_id) FROM demo_payments").fetchone()
        balance = conn.execute("SELECT balance FROM demo_wallet").fetchone()
    retried = set()
    done = 0
    if os.path.exists(args.ledger):
        for line in open(args.ledger):
            entry = json.loads(line)
            if "retry" in entry:
                retried.add(entry["id"])
            if entry.get("done"):
                done += 1
    debited = ACCOUNT_START - balance[0] if balance else None
    result = {
        "payments": done,
        "rows": rows[0],
        "distinct_payments": rows[1],
        "applied_twice": twice,
        "retried_payments": len(retried),
        "debited": debited,
    }
    problems = []
    if twice:
        problems.append(f"{twice} payments were applied more than once")
    if debited is not None and debited != rows[1]:
        problems.append(f"the wallet was debited {debited} times for {rows[1]} payments")
    result["problems"] = problems
    print(json.dumps(result))
    sys.exit(1 if problems else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pay")
    p.add_argument("--postgres", required=True)
    p.add_argument("--cgroup", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--ledger", required=True)
    p.add_argument("--retry", choices=["naive", "idempotent"], default="idempotent")
    v = sub.add_parser("verify")
    v.add_argument("--postgres", required=True)
    v.add_argument("--ledger", required=True)
    args = parser.parse_args()
    {"pay": pay, "verify": verify}[args.command](args)


if __name__ == "__main__":
    main()
