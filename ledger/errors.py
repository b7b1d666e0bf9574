"""The ledger's errors. The gateway maps them, by class, to HTTP responses.

LedgerError
├── InvalidArgument          bad amount, key, name or ttl; nothing was written
├── UnknownOrganization
├── UnknownPlan
├── UnknownCatalogEntry      capability or quality level not in the catalog
├── UnknownReservation
├── IdempotencyConflict      a key reused for a different request
├── PlanChangeNotAllowed     same plan, or a move in the wrong direction
├── InsufficientCredits      a hold was refused (remembered under its key)
├── LedgerImmutable          an attempt to rewrite history
└── LedgerUnavailable        PostgreSQL cannot be reached
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base of every ledger error."""


class InvalidArgument(LedgerError):
    pass


class UnknownOrganization(LedgerError):
    pass


class UnknownPlan(LedgerError):
    pass


class UnknownCatalogEntry(LedgerError):
    pass


class UnknownReservation(LedgerError):
    pass


class IdempotencyConflict(LedgerError):
    pass


class PlanChangeNotAllowed(LedgerError):
    pass


class LedgerImmutable(LedgerError):
    pass


class LedgerUnavailable(LedgerError):
    pass


class InsufficientCredits(LedgerError):
    """The spendable balance cannot cover the minimum hold."""

    def __init__(self, required_micro: int, spendable_micro: int) -> None:
        super().__init__(
            f"insufficient credits: {required_micro} micro-credits required, "
            f"{spendable_micro} spendable"
        )
        self.required_micro = required_micro
        self.spendable_micro = spendable_micro


# SQLSTATEs raised by the functions in sql/0004_credit_operations.up.sql.
SQLSTATE_ERRORS: dict[str, type[LedgerError]] = {
    "GL001": InvalidArgument,
    "GL002": UnknownOrganization,
    "GL003": UnknownPlan,
    "GL004": IdempotencyConflict,
    "GL005": UnknownReservation,
    "GL007": PlanChangeNotAllowed,
    "GL008": LedgerImmutable,
    "GL009": UnknownCatalogEntry,
}
