"""The policy layer's errors: what a plan, the catalog or a limit refuses.

PolicyError
├── UnknownCapability        X-Capability names nothing in the catalog
├── UnknownQualityLevel      X-Quality-Level names nothing in the catalog
├── ModelNotFound            the request's `model` is not in the catalog
├── AccessDenied             the plan does not allow it (carries the plans that do)
│   ├── CapabilityNotAllowed
│   ├── QualityNotAllowed
│   └── ModelNotAllowed
└── RateLimitExceeded        rpm or rpd used up (carries the time until a request passes)
"""

from __future__ import annotations


class PolicyError(Exception):
    """Base of every policy refusal."""


class UnknownCapability(PolicyError):
    pass


class UnknownQualityLevel(PolicyError):
    pass


class ModelNotFound(PolicyError):
    pass


class AccessDenied(PolicyError):
    reason = "access_denied"

    def __init__(self, message: str, upgrade_plans: list[str]) -> None:
        super().__init__(message)
        self.upgrade_plans = upgrade_plans


class CapabilityNotAllowed(AccessDenied):
    reason = "capability_not_allowed"


class QualityNotAllowed(AccessDenied):
    reason = "quality_not_allowed"


class ModelNotAllowed(AccessDenied):
    reason = "model_not_allowed"


class RateLimitExceeded(PolicyError):
    def __init__(self, message: str, *, window: str, limit: int, retry_after_ms: int) -> None:
        super().__init__(message)
        self.window = window
        self.limit = limit
        self.retry_after_ms = retry_after_ms
