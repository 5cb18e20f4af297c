from __future__ import annotations

import lago_org_billing


def test_contract_names_are_exported() -> None:
    """The public names of the contract are importable from the package root."""
    for name in (
        "OrgBillingMiddleware",
        "BillingSettings",
        "LagoClient",
        "OrgBilling",
        "attribute_usage",
        "LagoIntegrationError",
        "ConfigurationError",
        "LagoWebhooks",
        "billing_routes",
    ):
        assert name in lago_org_billing.__all__
        assert getattr(lago_org_billing, name) is not None


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, and every name in it exists."""
    assert lago_org_billing.__all__ == sorted(lago_org_billing.__all__, key=str.casefold)
    for name in lago_org_billing.__all__:
        assert hasattr(lago_org_billing, name)


def test_every_error_derives_from_the_base() -> None:
    """Every exported exception class is a LagoIntegrationError."""
    for name in lago_org_billing.__all__:
        value = getattr(lago_org_billing, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, lago_org_billing.LagoIntegrationError), name


def test_emulator_is_importable() -> None:
    """The emulator lives in lago_org_billing.testing as FakeLago."""
    from lago_org_billing.testing import FakeLago

    assert FakeLago().api_key


def test_loading_the_pytest_plugin_imports_nothing_heavy() -> None:
    """pytest loads the plugin (``pytest11`` entry point) in every run of every project that has this package
    installed: it imported the whole package (~0.2 s of every test run, httpx, starlette, anyio...) even where no
    fixture of it is used. The public names are imported at their first use now, and mean the same objects."""
    import subprocess
    import sys

    code = (
        "import sys, lago_org_billing.testing.pytest_plugin\n"
        "heavy = sorted(m for m in sys.modules if m in ('httpx', 'starlette', 'anyio', 'sqlite3') or "
        "m.startswith('lago_org_billing._') and m != 'lago_org_billing._version')\n"
        "print(heavy)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    from lago_org_billing import OrgBillingMiddleware
    from lago_org_billing._middleware import OrgBillingMiddleware as defined
    from lago_org_billing.testing import FakeLago
    from lago_org_billing.testing._emulator import FakeLago as emulator

    assert OrgBillingMiddleware is defined and FakeLago is emulator
    assert set(dir(lago_org_billing)) >= set(lago_org_billing.__all__)
    try:
        lago_org_billing.NoSuchName  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchName" in str(exc)
    else:
        raise AssertionError("an unknown name must be an AttributeError")


def test_the_emulator_is_served_over_http_with_a_public_function() -> None:
    """``serve_in_thread`` (a session's emulator, as the plugin's scope hint and the README say) is public, and serves
    the FakeLago given until its block ends."""
    import httpx

    import lago_org_billing.testing as testing
    from lago_org_billing.testing import FakeLago, serve_in_thread

    assert "serve_in_thread" in testing.__all__
    fake = FakeLago(api_key="k")
    with serve_in_thread(fake) as url:
        answer = httpx.get(f"{url}/api/v1/customers", headers={"Authorization": "Bearer k"})
        assert answer.status_code == 200
