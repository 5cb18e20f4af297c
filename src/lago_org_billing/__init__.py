"""Per-organization usage billing for SaaS and LLM APIs through Lago.

The public names are imported when first used (``from lago_org_billing import OrgBillingMiddleware`` imports the
middleware's modules then): importing the package, as pytest does in every run of a project that has it installed
(its plugin), costs next to nothing.
"""

from __future__ import annotations

import importlib
import sys

from ._version import __version__

# Not ``from typing import TYPE_CHECKING``: typing (~5 ms, a dozen modules) is not imported by the package, nor by the
# CLI's --help. mypy, pyright and IDEs take a name TYPE_CHECKING as true wherever it is defined.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping
    from typing import Any

    from ._attribution import AttributionConfig, Usage, attribute_usage
    from ._billing import OrgBilling
    from ._client import LagoClient, Page
    from ._delivery import EventPipeline
    from ._errors import (
        ClosedError,
        ConfigurationError,
        InvalidIdentifierError,
        InvalidRequestError,
        LagoAPIError,
        LagoAuthenticationError,
        LagoIntegrationError,
        LagoNotFoundError,
        LagoRateLimitError,
        LagoUnavailableError,
        LagoValidationError,
        QuotaBackendError,
        QuotaExceededError,
        UnknownSettingError,
    )
    from ._gate import QuotaDecision, require_quota
    from ._identity import (
        Identity,
        first_of,
        from_header,
        from_jwt_claim,
        from_state,
        from_user,
        get_current_org,
        get_current_user,
    )
    from ._metrics import PipelineMetrics, register_metrics
    from ._middleware import OrgBillingMiddleware
    from ._migration import (
        EntitlementsUnreadableError,
        Journal,
        JournalLock,
        JournalLockedError,
        MappingError,
        MigrationOptions,
        UnmovedHoldingsError,
        read_mapping_file,
        run_migration,
    )
    from ._quota import (
        QuotaConfig,
        QuotaGate,
        check_org_has_active_subscription,
        enforce_usage_limits,
        get_org_plan_limits,
    )
    from ._routes import BillingRouter, billing_routes
    from ._settings import BillingSettings
    from ._spool import DeadLetter
    from ._webhooks import LagoWebhooks, WebhookEvent

#: Public name -> the module defining it (imported at the first use of one of its names).
_EXPORTS = {
    "AttributionConfig": "._attribution",
    "BillingRouter": "._routes",
    "BillingSettings": "._settings",
    "ConfigurationError": "._errors",
    "DeadLetter": "._spool",
    "EventPipeline": "._delivery",
    "Identity": "._identity",
    "InvalidIdentifierError": "._errors",
    "InvalidRequestError": "._errors",
    "Journal": "._migration",
    "JournalLock": "._migration",
    "JournalLockedError": "._migration",
    "LagoAPIError": "._errors",
    "LagoAuthenticationError": "._errors",
    "LagoClient": "._client",
    "LagoIntegrationError": "._errors",
    "LagoNotFoundError": "._errors",
    "LagoRateLimitError": "._errors",
    "LagoUnavailableError": "._errors",
    "LagoValidationError": "._errors",
    "LagoWebhooks": "._webhooks",
    "MappingError": "._migration",
    "MigrationOptions": "._migration",
    "UnmovedHoldingsError": "._migration",
    "UnknownSettingError": "._errors",
    "EntitlementsUnreadableError": "._migration",
    "OrgBilling": "._billing",
    "OrgBillingMiddleware": "._middleware",
    "Page": "._client",
    "PipelineMetrics": "._metrics",
    "QuotaBackendError": "._errors",
    "ClosedError": "._errors",
    "QuotaConfig": "._quota",
    "QuotaDecision": "._gate",
    "QuotaExceededError": "._errors",
    "QuotaGate": "._quota",
    "Usage": "._attribution",
    "WebhookEvent": "._webhooks",
    "attribute_usage": "._attribution",
    "billing_routes": "._routes",
    "check_org_has_active_subscription": "._quota",
    "enforce_usage_limits": "._quota",
    "first_of": "._identity",
    "from_header": "._identity",
    "from_jwt_claim": "._identity",
    "from_state": "._identity",
    "from_user": "._identity",
    "get_current_org": "._identity",
    "get_current_user": "._identity",
    "get_org_plan_limits": "._quota",
    "read_mapping_file": "._migration",
    "register_metrics": "._metrics",
    "require_quota": "._gate",
    "run_migration": "._migration",
}


__all__ = [
    "__version__",
    "attribute_usage",
    "AttributionConfig",
    "billing_routes",
    "BillingRouter",
    "BillingSettings",
    "check_org_has_active_subscription",
    "ClosedError",
    "ConfigurationError",
    "DeadLetter",
    "enforce_usage_limits",
    "EntitlementsUnreadableError",
    "EventPipeline",
    "first_of",
    "from_header",
    "from_jwt_claim",
    "from_state",
    "from_user",
    "get_current_org",
    "get_current_user",
    "get_org_plan_limits",
    "Identity",
    "InvalidIdentifierError",
    "InvalidRequestError",
    "Journal",
    "JournalLock",
    "JournalLockedError",
    "LagoAPIError",
    "LagoAuthenticationError",
    "LagoClient",
    "LagoIntegrationError",
    "LagoNotFoundError",
    "LagoRateLimitError",
    "LagoUnavailableError",
    "LagoValidationError",
    "LagoWebhooks",
    "MappingError",
    "MigrationOptions",
    "OrgBilling",
    "OrgBillingMiddleware",
    "Page",
    "PipelineMetrics",
    "QuotaBackendError",
    "QuotaConfig",
    "QuotaDecision",
    "QuotaExceededError",
    "QuotaGate",
    "read_mapping_file",
    "register_metrics",
    "require_quota",
    "run_migration",
    "UnknownSettingError",
    "UnmovedHoldingsError",
    "Usage",
    "WebhookEvent",
]


def _lazy_exports(
    package: str, exports: Mapping[str, str], public: Collection[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of ``package``: a name of ``exports`` (name -> the relative module
    defining it) is imported at its first use, then kept in the package (found at once from then on); ``dir()`` lists
    ``public`` too. Any other name is an ``AttributeError``, as usual."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *public})

    return __getattr__, __dir__


if not TYPE_CHECKING:  # type checkers see the imports above: a module __getattr__ would let any name through as Any
    __getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, __all__)
