"""The daemon's status (`state/status.json`) as Prometheus metrics.

Made from the status the daemon publishes, never from the daemon itself: the
web process serves them at `/metrics`, and the daemon writes the same text
into `metrics_file` for node_exporter's textfile collector. Counters count
since the daemon started (Prometheus handles their reset at a restart).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

PREFIX = "dicom_watcher_"
DESTINATION_STATES = ("healthy", "unavailable", "hung")
HOOK_STATES = ("waiting", "running", "retrying", "failed")


def render(status: Mapping[str, Any], now: float) -> bytes:
    """The metrics of `status` as of `now` (wall seconds), in the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status, now))
    return generate_latest(registry)


class StatusCollector(Collector):
    def __init__(self, status: Mapping[str, Any], now: float) -> None:
        self.status = status
        self.now = now

    def collect(self) -> Iterator[Metric]:
        status = self.status
        labs: Mapping[str, Mapping[str, Any]] = status.get("labs") or {}
        for name, key, what in (
            (
                "placed_studies",
                "studies",
                "Studies placed for a lab (a late addition counts again)",
            ),
            ("placed_files", "files", "Files placed for a lab"),
            ("placed_bytes", "bytes", "Bytes placed for a lab"),
        ):
            family = CounterMetricFamily(PREFIX + name, what, labels=["lab"])
            for lab, counts in labs.items():
                family.add_metric([lab], float(counts.get(key, 0)))
            yield family
        delay = HistogramMetricFamily(
            PREFIX + "placement_delay_seconds",
            "Seconds from a study's last arrival to its placement",
            labels=["lab"],
        )
        for lab, counts in labs.items():
            buckets, total = [], 0
            for bound, count in counts.get("delay_buckets", []):
                total += int(count)
                buckets.append((_bound(bound), float(total)))
            if buckets:
                delay.add_metric([lab], buckets, float(counts.get("delay_sum", 0)))
        yield delay

        studies = status.get("studies") or []
        parked = [s for s in studies if s.get("parked_since") is not None]
        pending_by_lab: dict[str, list[int]] = {}
        for study in studies:
            for lab in study.get("labs") or ["(no lab yet)"]:
                entry = pending_by_lab.setdefault(lab, [0, 0, 0])
                entry[0] += 1
                entry[1] += int(study.get("files", 0))
                entry[2] += study.get("parked_since") is not None
        yield _gauge("pending_studies", "Studies waiting to be placed", len(studies))
        yield _gauge(
            "pending_files",
            "Files in the inbox not placed yet: read into pending studies, or arriving",
            sum(int(s.get("files", 0)) for s in studies) + int(status.get("files_arriving", 0)),
        )
        yield _gauge(
            "arriving_files", "Files in the inbox not read yet", status.get("files_arriving", 0)
        )
        yield _gauge("parked_studies", "Studies parked (a destination failed)", len(parked))
        oldest = max((self.now - float(s["parked_since"]) for s in parked), default=0.0)
        yield _gauge(
            "oldest_parked_study_seconds",
            "How long the longest-parked study has been parked",
            oldest,
        )
        by_lab = GaugeMetricFamily(
            PREFIX + "lab_pending_studies",
            "Studies waiting to be placed, per lab they go to",
            labels=["lab", "parked"],
        )
        for lab, (count, _files, parked_count) in sorted(pending_by_lab.items()):
            by_lab.add_metric([lab, "false"], count - parked_count)
            by_lab.add_metric([lab, "true"], parked_count)
        yield by_lab

        states = GaugeMetricFamily(
            PREFIX + "destination_state",
            "1 for a destination's current state (healthy, unavailable or hung)",
            labels=["destination", "state"],
        )
        since = GaugeMetricFamily(
            PREFIX + "destination_state_seconds",
            "How long a destination has been in its current state",
            labels=["destination"],
        )
        for destination in status.get("destinations") or []:
            name = str(destination["destination"])
            for state in DESTINATION_STATES:
                states.add_metric([name, state], float(destination["state"] == state))
            since.add_metric([name], max(self.now - float(destination["since"]), 0.0))
        yield states
        yield since

        yield _gauge("quarantined_files", "Files in quarantine", status.get("quarantine_files", 0))
        yield _gauge(
            "quarantine_failed_files",
            "Unreadable files that could not be moved into quarantine (kept in the inbox)",
            len(status.get("quarantine_failed") or []),
        )
        yield _gauge(
            "unmatched_files", "Files no rule matched (kept)", status.get("unmatched_files", 0)
        )

        hooks = GaugeMetricFamily(
            PREFIX + "hook_jobs", "Post-processing jobs by state", labels=["lab", "state"]
        )
        runner = GaugeMetricFamily(
            PREFIX + "hook_runner_alive",
            "1 when a lab's hook runner (dicom-watcher hooks) was seen lately",
            labels=["lab"],
        )
        hook_status = status.get("hooks") or {}
        operator = hook_status.get("operator") or {}
        for state in ("waiting", "running", "failed"):
            hooks.add_metric(["(operator)", state], float(operator.get(state, 0)))
        for lab, jobs in (hook_status.get("labs") or {}).items():
            for state in HOOK_STATES:
                hooks.add_metric([lab, state], float(jobs.get(state, 0)))
            runner.add_metric([lab], float(jobs.get("runner") == "alive"))
        yield hooks
        yield runner

        updated = float(status.get("updated", 0))
        yield _gauge(
            "last_loop_turn_age_seconds",
            "Seconds since the daemon's loop last published its status (every 2 s when alive)",
            max(self.now - updated, 0.0),
        )
        yield _gauge(
            "start_time_seconds", "When the daemon started (Unix time)", status.get("started", 0)
        )


def _gauge(name: str, what: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, what, value=float(value))


def _bound(bound: object) -> str:
    return "+Inf" if bound == "+Inf" else repr(float(bound))  # type: ignore[arg-type]
