"""Per-organization usage billing for SaaS and LLM APIs through Lago."""

from __future__ import annotations

from ._attribution import AttributionConfig, Usage, attribute_usage
from ._billing import OrgBilling
from ._client import LagoClient, Page
from ._delivery import EventPipeline
from ._errors import (
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
    Journal,
    JournalLock,
    JournalLockedError,
    MappingError,
    MigrationOptions,
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
from ._version import __version__
from ._webhooks import LagoWebhooks, WebhookEvent

__all__ = [
    "__version__",
    "attribute_usage",
    "AttributionConfig",
    "billing_routes",
    "BillingRouter",
    "BillingSettings",
    "check_org_has_active_subscription",
    "ConfigurationError",
    "DeadLetter",
    "enforce_usage_limits",
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
    "Usage",
    "WebhookEvent",
]
