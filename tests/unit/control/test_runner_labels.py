"""What a runner offers at a claim, from its row: its labels, and the strong-isolation label
only while its last attested measurements name a backend that gives one."""

from __future__ import annotations

import json

from stockade.api.protocol import STRONG_ISOLATION_LABEL
from stockade.control.fleet import REMEMBERED_MEASUREMENTS, runner_labels
from stockade.store.interface import RunnerRow


def runner(labels: list[str], measurements: dict[str, object]) -> RunnerRow:
    return RunnerRow("r1", "n", "default", json.dumps(labels), 1, "key", "active",
                     json.dumps(measurements), 1.0, 1.0, None)


def test_the_strong_label_follows_the_latest_measurements() -> None:
    plain = runner(["linux", STRONG_ISOLATION_LABEL], {"sandbox_backend": "bwrap"})
    strong = runner(["linux"], {"sandbox_backend": "runsc"})
    for _ in range(2):  # (the second time from what was remembered)
        assert runner_labels(plain) == ("linux",)
        assert runner_labels(strong) == ("linux", STRONG_ISOLATION_LABEL)
    assert runner_labels(runner(["linux"], {"sandbox_backend": "bwrap"})) == ("linux",)


def test_large_or_odd_measurements_are_read_each_time() -> None:
    pad = "x" * REMEMBERED_MEASUREMENTS
    big = runner(["a"], {"sandbox_backend": "runsc", "pad": pad})
    assert runner_labels(big) == ("a", STRONG_ISOLATION_LABEL)
    assert runner_labels(big._replace(measurements_json=json.dumps({"pad": pad}))) == ("a",)
    assert runner_labels(big._replace(measurements_json="[1]")) == ("a",)
