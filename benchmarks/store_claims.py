"""Raw claim throughput of the store, SQLite vs PostgreSQL, without HTTP.

A backlog of queued jobs is claimed to the end through ``Store.claim_attempt`` (one transaction
each: candidates, the update, an attempt row, an audit event) by T threads over S store
instances (S = 2 stands for two server replicas on one database). PostgreSQL is a throwaway
loopback cluster started as the test suite starts it (fsync off, as there), unless --postgres
names a database. Prints claims/s per configuration and ``RESULT {json}`` lines. Run as root
(the cluster runs as the postgres user).
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stockade.audit import AuditEvent  # noqa: E402
from stockade.store.interface import JobRow, Store  # noqa: E402
from stockade.store.open import open_store  # noqa: E402


def fill(store: Store, n: int) -> None:
    for i in range(n):
        store.insert_job(JobRow(f"j{i:06}", "bench", "{}", "[]", "queued", None, None, 0, None,
                                None, float(i), None, None, None),
                         AuditEvent("bench", "job.admitted", time.time(), f"j{i:06}"))


def drain(stores: list[Store], threads: int) -> tuple[int, float]:
    claimed = [0] * threads
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        store = stores[t % len(stores)]
        start.wait()
        while store.claim_attempt(f"r{t}", lambda j: 1e12,
                                  lambda j: AuditEvent("bench", "job.claimed", time.time(),
                                                       j.id),
                                  lambda j: True) is not None:
            claimed[t] += 1

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for p in pool:
        p.start()
    start.wait()
    began = time.perf_counter()
    for p in pool:
        p.join()
    return sum(claimed), time.perf_counter() - began


def run(kind: str, new_url: object, jobs: int, stores: int, threads: int) -> dict[str, object]:
    url = new_url()  # type: ignore[operator]
    opened = [open_store(url) for _ in range(stores)]
    fill(opened[0], jobs)
    n, elapsed = drain(opened, threads)
    assert n == jobs, (n, jobs)
    for s in opened:
        s.close()
    return {"backend": kind, "stores": stores, "threads": threads, "jobs": jobs,
            "claims_per_s": round(n / elapsed, 1), "ms_per_claim": round(1000 * elapsed / n, 3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--postgres", metavar="URL", help="an existing database's server (admin URL)")
    args = p.parse_args()
    import psycopg

    from tests.support.postgres import _bindir, _stop, start_server

    server = None if args.postgres else start_server()
    admin_url = args.postgres or server.url()  # type: ignore[union-attr]
    work = Path(tempfile.mkdtemp(prefix="stockade-bench-claims-"))

    def sqlite_url() -> str:
        return f"sqlite:///{work / (secrets.token_hex(4) + '.db')}"

    def postgres_url() -> str:
        name = f"bench_{secrets.token_hex(4)}"
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return admin_url.rsplit("/", 1)[0] + "/" + name

    results = []
    try:
        for kind, new_url in (("sqlite", sqlite_url), ("postgresql", postgres_url)):
            for stores, threads in ((1, 1), (1, 8), (2, 8)):
                r = run(kind, new_url, args.jobs, stores, threads)
                results.append(r)
                print(f"{kind:<11} stores={stores} threads={threads}: "
                      f"{r['claims_per_s']:>8} claims/s ({r['ms_per_claim']} ms each)",
                      flush=True)
    finally:
        if server is not None:
            _stop(_bindir(), server.base)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    for r in results:
        print("RESULT " + json.dumps(r))


if __name__ == "__main__":
    main()
