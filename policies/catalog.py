"""The catalog: providers, models, quality levels, capabilities, plans and top-up packages.

Validated once into frozen pydantic models; every cross-reference is checked here, so the
rest of the code can index the catalog without guarding against dangling names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

MICRO_PER_CREDIT = 1_000_000  # credits are stored as integer micro-credits


class Frozen(BaseModel):
    """Base for every config model: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def credits_to_micro(value: Decimal) -> int:
    """Convert a credit amount written in config to exact micro-credits."""
    micro = value * MICRO_PER_CREDIT
    if micro != micro.to_integral_value():
        raise ValueError(f"{value} has more than 6 decimal places")
    return int(micro)


Credits = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]
UsdPerMtok = Annotated[Decimal, Field(ge=0, max_digits=14, decimal_places=6)]
Limit = Annotated[int, Field(gt=0)] | None  # None (YAML null) means unlimited


class ProviderKind(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"


class ModelMode(StrEnum):
    CHAT = "chat"
    EMBEDDING = "embedding"


class ProviderSpec(Frozen):
    kind: ProviderKind
    api_base: str
    api_key_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")


class ModelSpec(Frozen):
    provider: str
    upstream: str
    mode: ModelMode = ModelMode.CHAT
    display_name: str | None = None
    tier: str | None = Field(default=None, pattern=r"^(fast|balanced|powerful)$")
    input_usd_per_mtok: UsdPerMtok
    output_usd_per_mtok: UsdPerMtok
    context_window: int = Field(gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    deprecated_at: AwareDatetime | None = None  # ISO 8601 with a zone, e.g. 2026-06-01T00:00:00Z
    replacement: str | None = None


class QualityLevelSpec(Frozen):
    name: str | None = None
    description: str | None = None
    credit_multiplier: Annotated[Decimal, Field(gt=0, max_digits=8, decimal_places=4)]
    models: tuple[str, ...] = Field(min_length=1)


class CapabilitySpec(Frozen):
    name: str | None = None
    description: str | None = None
    category: str | None = None
    icon: str | None = None
    estimated_credits: dict[str, Credits] = Field(min_length=1)
    max_output_tokens: int | None = Field(default=None, gt=0)
    models: dict[str, tuple[str, ...]] = Field(default_factory=dict)


class PlanCapabilitySpec(Frozen):
    quality: tuple[str, ...] = Field(min_length=1)
    rpm: Limit = None
    rpd: Limit = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    models: dict[str, tuple[str, ...]] = Field(default_factory=dict)


class PlanSpec(Frozen):
    name: str | None = None
    monthly_credits: Credits
    welcome_bonus: Credits = Decimal(0)
    overdraft: Credits = Decimal(0)
    capabilities: dict[str, PlanCapabilitySpec]


class TopupPackageSpec(Frozen):
    name: str | None = None
    credits: Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=6)]
    price_usd_cents: int = Field(gt=0)
    popular: bool = False


class Defaults(Frozen):
    capability: str
    quality: str
    embedding_capability: str | None = None  # for /v1/embeddings without X-Capability


Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", max_length=100)]


class Catalog(Frozen):
    """What is sold: the part of config.yaml that is synced into PostgreSQL."""

    defaults: Defaults
    providers: dict[Name, ProviderSpec] = Field(min_length=1)
    models: dict[Name, ModelSpec] = Field(min_length=1)
    quality_levels: dict[Name, QualityLevelSpec] = Field(min_length=1)
    capabilities: dict[Name, CapabilitySpec] = Field(min_length=1)
    plans: dict[Name, PlanSpec] = Field(min_length=1)
    topup_packages: dict[Name, TopupPackageSpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references_resolve(self) -> Catalog:
        problems = list(_dangling_references(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # Derived lookups. Plans are ordered as written: a later plan is an upgrade.
    def plan_rank(self, plan: str) -> int:
        return list(self.plans).index(plan)

    def models_for(self, plan: str, capability: str, quality: str) -> tuple[str, ...]:
        """Models a plan may use for a capability at a quality, in priority order."""
        plan_cap = self.plans[plan].capabilities.get(capability)
        if plan_cap is None or quality not in plan_cap.quality:
            return ()
        if quality in plan_cap.models:
            return plan_cap.models[quality]
        cap_models = self.capabilities[capability].models
        if quality in cap_models:
            return cap_models[quality]
        return self.quality_levels[quality].models

    def plans_allowing(self, capability: str, quality: str | None = None) -> list[str]:
        """Names of the plans that allow a capability (at a quality), lowest first."""
        return [
            name
            for name, plan in self.plans.items()
            if capability in plan.capabilities
            and (quality is None or quality in plan.capabilities[capability].quality)
        ]


def _dangling_references(cat: Catalog) -> Iterator[str]:
    yield from _model_references(cat)
    for name, level in cat.quality_levels.items():
        yield from _unknown_models(cat, f"quality_levels.{name}.models", level.models)
    for name, cap in cat.capabilities.items():
        where = f"capabilities.{name}"
        yield from _unknown_qualities(cat, f"{where}.estimated_credits", cap.estimated_credits)
        yield from _model_lists(cat, where, cap.models)
    for plan_name, plan in cat.plans.items():
        for cap_name, plan_cap in plan.capabilities.items():
            where = f"plans.{plan_name}.capabilities.{cap_name}"
            if cap_name not in cat.capabilities:
                yield f"{where}: unknown capability {cap_name!r}"
                continue
            yield from _unknown_qualities(cat, f"{where}.quality", plan_cap.quality)
            yield from _model_lists(cat, where, plan_cap.models)
    yield from _default_references(cat)


def _model_references(cat: Catalog) -> Iterator[str]:
    for name, model in cat.models.items():
        if model.provider not in cat.providers:
            yield f"models.{name}.provider: unknown provider {model.provider!r}"
        if model.replacement is not None and model.replacement not in cat.models:
            yield f"models.{name}.replacement: unknown model {model.replacement!r}"


def _model_lists(cat: Catalog, where: str, lists: dict[str, tuple[str, ...]]) -> Iterator[str]:
    yield from _unknown_qualities(cat, f"{where}.models", lists)
    for quality, models in lists.items():
        yield from _unknown_models(cat, f"{where}.models.{quality}", models)


def _default_references(cat: Catalog) -> Iterator[str]:
    if cat.defaults.capability not in cat.capabilities:
        yield f"defaults.capability: unknown capability {cat.defaults.capability!r}"
    embedding = cat.defaults.embedding_capability
    if embedding is not None and embedding not in cat.capabilities:
        yield f"defaults.embedding_capability: unknown capability {embedding!r}"
    if cat.defaults.quality not in cat.quality_levels:
        yield f"defaults.quality: unknown quality level {cat.defaults.quality!r}"


def _unknown_models(cat: Catalog, where: str, models: tuple[str, ...]) -> Iterator[str]:
    for model in models:
        if model not in cat.models:
            yield f"{where}: unknown model {model!r}"
    if len(set(models)) != len(models):
        yield f"{where}: a model is listed twice"


def _unknown_qualities(cat: Catalog, where: str, qualities: Iterable[str]) -> Iterator[str]:
    for quality in qualities:
        if quality not in cat.quality_levels:
            yield f"{where}: unknown quality level {quality!r}"
