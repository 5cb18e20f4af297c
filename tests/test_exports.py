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
