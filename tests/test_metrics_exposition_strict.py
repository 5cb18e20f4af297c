"""Review of the Prometheus metrics as an SRE scrapes them in production: every exposition (text 0.0.4 and
OpenMetrics, registry mode and prometheus_client's multiprocess mode) parses with prometheus_client's strict parsers,
each family once with its HELP and TYPE, counters ending ``_total``, the histogram with its ``+Inf`` bucket, ``_sum``
and ``_count``, no series twice; the number of series stays the same however many org ids a spoofable header brings;
``/metrics`` mounted as the README says is neither billed nor gated nor counted as a request; and every exported
name is documented (the README's names, and the module's list)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from lago_org_billing import BillingSettings, OrgBillingMiddleware, PipelineMetrics, _metrics, register_metrics

prometheus_client = pytest.importorskip("prometheus_client", reason="prometheus_client is not installed")
from prometheus_client import CollectorRegistry, make_asgi_app, values  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.openmetrics.parser import (  # noqa: E402
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


async def chat(request: Request) -> Response:
    return JSONResponse({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


@pytest.fixture
def settings(fake_lago: Any) -> BillingSettings:
    fake_lago.add_billable_metric("api_call", aggregation_type="sum_agg", field_name="total_tokens")
    fake_lago.add_plan("starter", amount_cents=1000)
    fake_lago.add_subscription("org_a", "starter", external_id="org_a")
    return BillingSettings(
        api_url=fake_lago.base_url,
        api_key=fake_lago.api_key,
        org_header="X-Org-Id",
        exclude_paths=("/metrics",),
        retry_backoff=0.001,
    )


def served(registry: Any, settings: BillingSettings, fake_lago: Any, **options: Any) -> OrgBillingMiddleware:
    """The README's setup: ``/metrics`` mounted in the app (and excluded), the middleware around it."""
    app = Starlette(routes=[Route("/v1/chat", chat), Mount("/metrics", make_asgi_app(registry=registry))])
    return OrgBillingMiddleware(app, settings, transport=fake_lago.transport(), **options)


def check_text(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The Prometheus text format, strictly: one HELP and one TYPE per family, before its samples; no series twice;
    counters' samples end ``_total``; histograms end with ``+Inf`` and have ``_sum`` and ``_count``. Returns the
    samples by (name, labels)."""
    helps = re.findall(r"^# HELP (\S+) ", text, re.M)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert len(helps) == len(set(helps)) and sorted(helps) == sorted(types), text
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        assert family.type in ("counter", "gauge", "histogram"), family
        names = {sample.name for sample in family.samples}
        if family.type == "counter":
            assert all(name.endswith("_total") for name in names), family
        if family.type == "histogram":
            assert {f"{family.name}_sum", f"{family.name}_count"} <= names, family
            buckets = [s for s in family.samples if s.name.endswith("_bucket")]
            assert buckets[-1].labels["le"] == "+Inf"
            counts = [s.value for s in buckets]
            assert counts == sorted(counts)
            count = next(s.value for s in family.samples if s.name.endswith("_count"))
            assert counts[-1] == count
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"{key} twice"
            samples[key] = sample.value
    return samples


def check_openmetrics(text: str) -> None:
    assert text.endswith("# EOF\n")
    families = list(openmetrics_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names))


async def scrape(http: httpx.AsyncClient, *, openmetrics: bool = False) -> str:
    headers = {"Accept": OPENMETRICS} if openmetrics else {}
    response = await http.get("/metrics", headers=headers, follow_redirects=True)  # Prometheus follows the 307
    assert response.status_code == 200
    return response.text


# -- registry mode -----------------------------------------------------------------------------------------------------


async def test_exposition_parses_strictly_in_both_formats(fake_lago: Any, settings: BillingSettings) -> None:
    """Traffic, a Lago error and a delivery: the scrape parses strictly as text and as OpenMetrics."""
    registry = CollectorRegistry()
    middleware = served(registry, settings, fake_lago, metrics_registry=registry)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_a"})).status_code == 200
            assert await middleware.pipeline.flush(5)
            middleware.pipeline.metrics.lago_error(503)
            middleware.pipeline.metrics.lago_error(None)
            samples = check_text(await scrape(http))
            check_openmetrics(await scrape(http, openmetrics=True))
    finally:
        await middleware.aclose()
    assert samples["lago_billing_requests_billed_total", ()] == 1
    assert samples["lago_billing_lago_errors_total", (("status", "503"),)] == 1
    assert samples["lago_billing_lago_errors_total", (("status", "network"),)] == 1
    assert samples["lago_billing_delivery_seconds_count", ()] >= 1


async def test_spoofed_org_ids_add_no_series(fake_lago: Any, settings: BillingSettings) -> None:
    """Org ids come from a header any client sets: 40 made-up ones (quotes, backslashes, newlines among them) add no
    series to the scrape, only counts."""
    registry = CollectorRegistry()
    middleware = served(registry, settings, fake_lago, metrics_registry=registry)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_a"})).status_code == 200
            before = check_text(await scrape(http))
            for number in range(40):
                await http.get("/v1/chat", headers={"X-Org-Id": f'spoof"\\{number}'})
            after = check_text(await scrape(http))
    finally:
        await middleware.aclose()
    assert set(after) == set(before)
    assert after["lago_billing_requests_total", ()] == 41
    assert not any("spoof" in str(key) for key in after)


async def test_the_metrics_endpoint_is_neither_billed_nor_gated(fake_lago: Any, settings: BillingSettings) -> None:
    """Scrapes of ``/metrics`` (excluded, as the README says; the 307 to ``/metrics/`` of a mount included), with or
    without an org header: no event, no quota check, not in ``requests_total``; only in ``requests_excluded_total``."""
    registry = CollectorRegistry()
    middleware = served(registry, settings, fake_lago, metrics_registry=registry, on_unresolved="reject")
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            for _ in range(3):
                await scrape(http)
                response = await http.get("/metrics/", headers={"X-Org-Id": "org_a"})
                assert response.status_code == 200
            samples = check_text(await scrape(http))
            assert await middleware.pipeline.flush(5)
    finally:
        await middleware.aclose()
    assert samples["lago_billing_requests_total", ()] == 0
    assert samples["lago_billing_events_recorded_total", ()] == 0
    assert samples["lago_billing_quota_checks_total", ()] == 0
    assert samples["lago_billing_requests_excluded_total", ()] >= 9
    assert fake_lago.events == []


# -- multiprocess mode -------------------------------------------------------------------------------------------------


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """prometheus_client's multiprocess mode in this process, on a fresh directory; syncs only when called."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(values, "ValueClass", value_class)
    monkeypatch.setattr(_metrics, "_multiprocess", None)
    monkeypatch.setattr(_metrics, "_SYNC_INTERVAL", 3600.0)
    yield tmp_path
    state = _metrics._multiprocess
    if state is not None:
        state.close()
    value_class.close_all_files()


async def test_multiprocess_exposition_parses_strictly(
    multiprocess: Path, fake_lago: Any, settings: BillingSettings
) -> None:
    """``MultiProcessCollector`` over the mirrored files: the scrape parses strictly in both formats, and its counters
    never go back when the app is served again (a new pipeline and gate)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiprocess))  # type: ignore[no-untyped-call]
    middleware = served(registry, dataclasses.replace(settings, metrics=True), fake_lago)
    assert _metrics._multiprocess is not None
    seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for _ in range(2):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as http:
            assert (await http.get("/v1/chat", headers={"X-Org-Id": "org_a"})).status_code == 200
            assert await middleware.pipeline.flush(5)
            middleware.pipeline.metrics.lago_error(429)
            _metrics._multiprocess.sync()
            samples = check_text(await scrape(http))
            check_openmetrics(await scrape(http, openmetrics=True))
        await middleware.aclose()
        _metrics._multiprocess.sync()
        for key, value in seen.items():
            if key[0].endswith("_total"):
                assert samples.get(key, 0) >= value, key
        seen = samples
        middleware._renew()
    assert seen["lago_billing_requests_billed_total", ()] == 2
    assert seen["lago_billing_lago_errors_total", (("status", "429"),)] == 2


# -- names -------------------------------------------------------------------------------------------------------------


def exported_counters() -> set[str]:
    registry = CollectorRegistry()
    assert PipelineMetrics().register(registry)
    collector = next(iter(registry._collector_to_names))
    return {
        family.name.removeprefix("lago_billing_") + "_total"
        for family in collector.describe()
        if family.type == "counter"
    }


def test_every_exported_counter_is_in_the_module_list() -> None:
    """The module's docstring (what ``help(lago_org_billing._metrics)`` shows) names every counter it exports."""
    documented = set(re.findall(r"``([a-z_]+_total)(?:``|\{)", _metrics.__doc__ or ""))
    gate = {name for name in exported_counters() if name.startswith("quota_")}
    missing = exported_counters() - gate - documented
    assert not missing, f"not in the module's list: {sorted(missing)}"
    for name in gate:
        assert name.removeprefix("quota_").removesuffix("_total") in (_metrics.__doc__ or ""), name


def test_the_readme_names_are_exported() -> None:
    """Every ``lago_billing`` name the README's Metrics section spells out is one the collector exports."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Metrics") : readme.index("## Configuration")]
    registry = CollectorRegistry()
    assert register_metrics(type("M", (), {"stats": {}, "pipeline": None, "quota": None})(), registry)
    collector = next(iter(registry._collector_to_names))
    exported = {family.name.removeprefix("lago_billing_") for family in collector.describe()}
    exported |= {name + "_total" for name in exported}
    spelled = set(
        re.findall(r"`([a-z_]+_total|queue_depth|spool_[a-z_]+|delivery_seconds|requests_in_flight)`", section)
    )
    spelled |= {"quota_redis_fallback"} if "quota_redis_fallback" in section else set()
    assert spelled and spelled <= exported, sorted(spelled - exported)
