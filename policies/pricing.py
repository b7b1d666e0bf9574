"""Credit math (SPEC §4), exact: Decimal arithmetic, one ceiling at the end, integer
micro-credits out. Prices are USD per million tokens, so tokens × price is micro-USD, and
micro-USD × credits-per-USD is micro-credits."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal


@dataclass(frozen=True)
class Rate:
    """What one token costs on one model at one quality level, in micro-credits."""

    input_usd_per_mtok: Decimal
    output_usd_per_mtok: Decimal
    per_usd: Decimal
    multiplier: Decimal

    @property
    def input_micro_per_token(self) -> Decimal:
        return self.input_usd_per_mtok * self.per_usd * self.multiplier

    @property
    def output_micro_per_token(self) -> Decimal:
        return self.output_usd_per_mtok * self.per_usd * self.multiplier


def charge_micro(rate: Rate, prompt_tokens: int, completion_tokens: int) -> int:
    """ceil((prompt × input + completion × output) × per_usd × multiplier) micro-credits."""
    usd_micro = (
        prompt_tokens * rate.input_usd_per_mtok + completion_tokens * rate.output_usd_per_mtok
    )
    exact = usd_micro * rate.per_usd * rate.multiplier
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def affordable_output_tokens(rate: Rate, prompt_tokens: int, hold_micro: int) -> int | None:
    """The most completion tokens whose charge stays within `hold_micro` (None: no limit,
    output is free). Negative when even the prompt does not fit."""
    per_token = rate.output_micro_per_token
    if per_token == 0:
        return None
    room = Decimal(hold_micro) - prompt_tokens * rate.input_micro_per_token
    return int((room / per_token).to_integral_value(rounding=ROUND_FLOOR))


def credits_text(micro: int) -> str:
    """Micro-credits as an exact decimal number of credits: 660 -> "0.00066"."""
    whole, frac = divmod(abs(micro), 1_000_000)
    text = f"{whole}.{frac:06d}".rstrip("0").rstrip(".")
    return f"-{text}" if micro < 0 else text


def credits_number(micro: int) -> float:
    """Micro-credits as a JSON number of credits; exact to the micro-credit below 10^9
    credits, where a double still resolves 10^-6."""
    return micro / 1_000_000
