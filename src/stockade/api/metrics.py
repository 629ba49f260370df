"""Prometheus metrics of one server process (``GET /metrics``, a viewer's token): counters of
what this replica did, and gauges read from the database when scraped (the same on every
replica). Scrape every replica, as with any horizontally scaled service.

(No postponed annotations here: FastAPI reads the endpoints' annotations at run time.)
"""

from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stockade.store.interface import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The counters a server process keeps."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        self.attestations = Counter(
            "stockade_runner_attestations", "Runner attestations (enrolments and renewals)",
            ["stage", "result"], registry=self.registry)
        self.claims = Counter("stockade_claims", "Jobs handed to runner agents",
                              registry=self.registry)
        self.refusals = Counter("stockade_api_refusals", "API requests refused (401/403)",
                                registry=self.registry)
        self.registry.register(_Database(store))


class _Database(Collector):
    """Gauges read from the store at scrape time."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Any:
        """Jobs by status and runners by status."""
        store = self.store
        jobs = GaugeMetricFamily("stockade_jobs", "Jobs by status", labels=["status"])
        for status, count in store.count_jobs_by_status():
            jobs.add_metric([status], count)
        yield jobs
        runners = GaugeMetricFamily("stockade_runners", "Runner agents by status",
                                    labels=["status"])
        counts: dict[str, int] = {}
        for r in store.runners():
            counts[r.status] = counts.get(r.status, 0) + 1
        for status, count in sorted(counts.items()):
            runners.add_metric([status], count)
        yield runners


def add_routes(app: FastAPI, metrics: Metrics) -> None:
    """``GET /metrics``."""

    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE)
