"""Per-organization usage billing for SaaS and LLM APIs through Lago."""

from __future__ import annotations

from ._billing import OrgBilling
from ._client import LagoClient, Page
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
)
from ._settings import BillingSettings
from ._version import __version__

__all__ = [
    "BillingSettings",
    "ConfigurationError",
    "InvalidIdentifierError",
    "InvalidRequestError",
    "LagoAPIError",
    "LagoAuthenticationError",
    "LagoClient",
    "LagoIntegrationError",
    "LagoNotFoundError",
    "LagoRateLimitError",
    "LagoUnavailableError",
    "LagoValidationError",
    "OrgBilling",
    "Page",
    "__version__",
]
