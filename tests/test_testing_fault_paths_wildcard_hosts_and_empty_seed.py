"""The emulator's test controls as users give them: a fault ``path`` written with a trailing slash (or a doubled one),
``serve_in_thread`` on every interface, and ``--seed`` given an empty name."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from lago_org_billing.cli import main
from lago_org_billing.testing import FakeLago, FakeLagoError, serve_in_thread
from lago_org_billing.testing._server import install_controls

pytestmark = pytest.mark.anyio

API_KEY = "test-api-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def faulted() -> FakeLago:
    fake = install_controls(FakeLago(api_key=API_KEY))
    fake.add_customer(external_id="acme")
    return fake


# --------------------------------------------------------------------------- fault paths


@pytest.mark.parametrize("request_path", ["/api/v1/customers", "/api/v1/customers/", "/api/v1/customers/acme"])
async def test_a_fault_path_with_a_trailing_slash_applies_to_the_endpoint_it_names(request_path: str) -> None:
    """``"path": "/api/v1/customers/"``: the emulator serves ``/api/v1/customers/`` as ``/api/v1/customers`` (as
    Rails does), and the rule met only the path so normalized: the request for exactly its path, and the endpoint
    itself, were answered 200, the fault never firing."""
    fake = faulted()
    async with fake.client() as client:
        assert (await client.post("/_emulator/faults", json={"status": 503, "path": "/api/v1/customers/"})).is_success
        assert (await client.get(request_path)).status_code == 503


async def test_a_fault_path_with_a_trailing_slash_still_spares_its_neighbours() -> None:
    """The trailing slash keeps its meaning of a whole segment: ``/api/v1/events/`` faults ``/api/v1/events`` and what
    lies under it, not ``/api/v1/events_enriched``; without the slash a rule stays a prefix of the path's text."""
    fake = install_controls(FakeLago(api_key=API_KEY, event_store="clickhouse"))
    fake.inject_fault(status=503, path="/api/v1/events/")
    fake.inject_fault(status=500, path="/api/v1/subscriptions/sub_")
    async with fake.client() as client:
        assert (await client.get("/api/v1/events_enriched")).status_code == 200
        assert (await client.get("/api/v1/events")).status_code == 503
        assert (await client.get("/api/v1/events/tx_1")).status_code == 503
        assert (await client.get("/api/v1/subscriptions/sub_42")).status_code == 500
        assert (await client.get("/api/v1/subscriptions/other")).status_code == 404


async def test_a_fault_path_with_a_doubled_slash_applies_as_the_emulator_routes() -> None:
    """``"/api/v1//customers"`` (a prefix joined to ``/customers``): the emulator serves ``/api/v1//customers`` as
    ``/api/v1/customers``, so the rule could never apply; it is taken as that path, and listed so."""
    fake = faulted()
    async with fake.client() as client:
        added = await client.post("/_emulator/faults", json={"status": 503, "count": 1, "path": "/api/v1//customers"})
        assert added.status_code == 201 and added.json()["fault"]["path"] == "/api/v1/customers"
        assert (await client.get("/api/v1//customers")).status_code == 503
        assert (await client.get("/api/v1/customers")).status_code == 200


def test_a_served_fault_path_with_a_trailing_slash_applies_to_the_request_sent_with_it() -> None:
    """Over HTTP, as a shell script gives it: the fault for ``/api/v1/customers/`` answers the request for that very
    path (it was served 200)."""
    fake = faulted()
    with serve_in_thread(fake) as url, httpx.Client(base_url=url, headers=AUTH) as client:
        assert client.post("/_emulator/faults", json={"status": 503, "count": 1, "path": "/api/v1/customers/"})
        assert client.get("/api/v1/customers/").status_code == 503
        assert client.get("/api/v1/customers/").status_code == 200


# --------------------------------------------------------------------------- serve_in_thread on every interface


@pytest.mark.parametrize(("host", "loopback"), [("0.0.0.0", "127.0.0.1"), ("::", "[::1]")])
def test_served_on_every_interface_the_url_is_the_loopback(host: str, loopback: str) -> None:
    """``serve_in_thread(fake, host="0.0.0.0")`` (a container reaching the host's emulator) yielded
    ``http://0.0.0.0:<port>``, no address to call (Windows refuses to connect to it), and signed the JWT webhooks with
    it as issuer, which an app pointed at ``http://127.0.0.1:<port>`` refused: the loopback URL now, as the
    ``emulator`` command prints it."""
    if host == "::" and not socket.has_ipv6:  # pragma: no cover - machines without IPv6
        pytest.skip("no IPv6")
    fake = FakeLago(api_key=API_KEY)
    try:
        with serve_in_thread(fake, host=host) as url:
            assert url.startswith(f"http://{loopback}:")
            assert fake.webhook_dispatcher is not None and fake.webhook_dispatcher.issuer == url
            assert httpx.get(f"{url}/health").status_code == 200
    except OSError as exc:  # pragma: no cover - no IPv6 loopback here
        pytest.skip(f"cannot serve on {host}: {exc}")


# --------------------------------------------------------------------------- --seed ""


def test_an_empty_seed_file_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--seed "$SEED_FILE"`` with the variable unset: the emulator started without its seed, silently, and the tests
    against it failed later on plans that were never there. One error line and exit 2 now, before serving."""
    with socket.create_server(("127.0.0.1", 0)) as taken:  # (were it served, the port in use would end it: exit 2)
        code = main(["emulator", "--port", str(taken.getsockname()[1]), "--seed", ""])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "seed file name is empty" in err, err


def test_from_seed_file_refuses_an_empty_name() -> None:
    """``FakeLago.from_seed_file("")`` read ``.`` (``Path("")``) and said "cannot read ... '.': Is a directory"."""
    with pytest.raises(FakeLagoError, match="seed file name is empty"):
        FakeLago.from_seed_file("")
