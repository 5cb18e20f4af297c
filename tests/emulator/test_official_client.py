"""The official ``lago-python-client`` (sync, module-level httpx calls) against the served emulator."""

from __future__ import annotations

import time
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from lago_python_client.client import Client
from lago_python_client.exceptions import LagoApiError
from lago_python_client.models import (
    BatchEvent,
    BillableMetric,
    Charge,
    Charges,
    Customer,
    Event,
    Plan,
    Subscription,
)

from lago_org_billing.testing import FakeLago
from lago_org_billing.testing._server import EmulatorServerError, serve_in_thread


@pytest.fixture
def fake(fake_lago_server: FakeLago) -> FakeLago:
    """The plugin's FakeLago, served on 127.0.0.1 (``fake.url``)."""
    return fake_lago_server


@pytest.fixture
def client(fake: Any) -> Client:
    """The official client pointed at the served fake."""
    assert fake.url.startswith("http://127.0.0.1:")
    return Client(api_key=fake.api_key, api_url=fake.url + "/", max_retries=0)


def make_plan(client: Client, *, code: str = "pro", metric_code: str = "api_call") -> Any:
    """Create a count metric and a monthly plan charging it, through the official client."""
    metric = client.billable_metrics.create(
        BillableMetric(name="API calls", code=metric_code, aggregation_type="count_agg")
    )
    charge = Charge(billable_metric_id=metric.lago_id, charge_model="standard", properties={"amount": "0.01"})
    return client.plans.create(
        Plan(
            name="Pro",
            code=code,
            interval="monthly",
            amount_cents=1000,
            amount_currency="USD",
            pay_in_advance=False,
            charges=Charges(__root__=[charge]),
        )
    )


def test_customers_crud(client: Client) -> None:
    """customers: create (upsert), find, find_all, destroy parse without errors."""
    created = client.customers.create(Customer(external_id="acme", name="Acme", currency="USD", email="a@acme.io"))
    assert created is not None
    assert created.external_id == "acme"
    assert created.lago_id
    again = client.customers.create(Customer(external_id="acme", name="Acme Inc"))
    assert again is not None and again.lago_id == created.lago_id and again.name == "Acme Inc"

    found = client.customers.find("acme")
    assert (found.external_id, found.email) == ("acme", "a@acme.io")

    listed = client.customers.find_all({"per_page": 10})
    assert [c.external_id for c in listed["customers"]] == ["acme"]
    assert listed["meta"]["total_count"] == 1

    deleted = client.customers.destroy("acme")
    assert deleted.external_id == "acme"
    with pytest.raises(LagoApiError) as caught:
        client.customers.find("acme")
    assert caught.value.status_code == 404
    assert caught.value.response["code"] == "customer_not_found"


def test_billable_metrics_and_plans(client: Client) -> None:
    """billable_metrics and plans: create, find and find_all parse without errors."""
    plan = make_plan(client)
    assert plan.code == "pro"
    assert plan.charges and plan.charges.__root__[0].billable_metric_code == "api_call"
    assert client.billable_metrics.find("api_call").aggregation_type == "count_agg"
    assert [m.code for m in client.billable_metrics.find_all()["billable_metrics"]] == ["api_call"]
    assert client.plans.find("pro").amount_cents == 1000
    assert [p.code for p in client.plans.find_all()["plans"]] == ["pro"]


def test_subscriptions_lifecycle(client: Client) -> None:
    """subscriptions: create, find, find_all, destroy (terminate) parse without errors."""
    make_plan(client)
    client.customers.create(Customer(external_id="acme"))
    sub = client.subscriptions.create(
        Subscription(external_customer_id="acme", plan_code="pro", external_id="acme_main", billing_time="calendar")
    )
    assert sub is not None
    assert (sub.external_id, sub.status, sub.plan_code) == ("acme_main", "active", "pro")
    assert client.subscriptions.find("acme_main").lago_id == sub.lago_id
    listed = client.subscriptions.find_all({"external_customer_id": "acme"})
    assert [s.external_id for s in listed["subscriptions"]] == ["acme_main"]

    terminated = client.subscriptions.destroy("acme_main")
    assert terminated.status == "terminated"
    assert client.subscriptions.find_all({"external_customer_id": "acme"})["subscriptions"] == []


def test_events_and_current_usage(client: Client) -> None:
    """events.create (string timestamp), events.batch_create and customers.current_usage round-trip."""
    make_plan(client)
    client.customers.create(Customer(external_id="acme"))
    client.subscriptions.create(Subscription(external_customer_id="acme", plan_code="pro", external_id="acme_main"))
    timestamp = f"{time.time():.3f}"  # a string keeps the milliseconds (a float would be truncated)

    event = client.events.create(
        Event(transaction_id="tx_1", external_subscription_id="acme_main", code="api_call", timestamp=timestamp)
    )
    assert event is not None
    assert (event.transaction_id, event.code) == ("tx_1", "api_call")
    client.events.batch_create(
        BatchEvent(
            events=[
                Event(transaction_id=f"tx_{i}", external_subscription_id="acme_main", code="api_call")
                for i in range(2, 5)
            ]
        )
    )
    usage = client.customers.current_usage("acme", "acme_main", apply_taxes="false")
    [charge_usage] = usage.charges_usage
    assert float(charge_usage.units) == 4
    assert charge_usage.billable_metric.code == "api_call"


def test_invoices_find_all(client: Client, fake: FakeLago) -> None:
    """invoices.find_all parses the emulator's invoice list."""
    client.customers.create(Customer(external_id="acme"))
    fake.add_invoice("acme", total_amount_cents=1234, currency="USD")
    listed = client.invoices.find_all({"external_customer_id": "acme"})
    [invoice] = listed["invoices"]
    assert invoice.total_amount_cents == 1234
    assert listed["meta"]["total_count"] == 1


def test_webhook_public_key(client: Client, fake: FakeLago) -> None:
    """webhooks.public_key() returns the emulator's PEM public key."""
    pem = client.webhooks.public_key()
    assert pem.strip() == fake.rsa_public_key_pem.strip()
    serialization.load_pem_public_key(pem)


def test_lago_api_error_carries_lago_codes(client: Client) -> None:
    """404 and 422 answers reach LagoApiError with Lago's code and error_details."""
    with pytest.raises(LagoApiError) as not_found:
        client.subscriptions.find("nope")
    assert not_found.value.status_code == 404
    assert not_found.value.response["code"] == "subscription_not_found"

    with pytest.raises(LagoApiError) as no_plan:
        client.subscriptions.create(Subscription(external_customer_id="acme", plan_code="ghost", external_id="s1"))
    assert no_plan.value.status_code == 404
    assert no_plan.value.response["code"] == "plan_not_found"

    with pytest.raises(LagoApiError) as invalid:
        client.billable_metrics.create(BillableMetric(name="x", code="x", aggregation_type="median_agg"))
    assert invalid.value.status_code == 422
    assert invalid.value.response["code"] == "validation_errors"
    assert "aggregation_type" in invalid.value.response["error_details"]


def test_wrong_api_key_is_401(fake: Any) -> None:
    """A wrong API key is refused with 401 Unauthorized."""
    client = Client(api_key="wrong", api_url=fake.url + "/", max_retries=0)
    with pytest.raises(LagoApiError) as caught:
        client.customers.find_all()
    assert caught.value.status_code == 401


def test_serve_in_thread_reports_a_taken_port(fake: Any) -> None:
    """Serving on a port already in use fails fast with EmulatorServerError, not a hang."""
    port = int(fake.url.rsplit(":", 1)[1])
    with pytest.raises(EmulatorServerError, match="could not be served"), serve_in_thread(fake, port=port):
        pass  # pragma: no cover - never entered
