"""The access policy: which models a request may use, given the plan, the capability, the
quality level and the model the client named (SPEC §5, seed plan T3.2)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from policies.catalog import Catalog, ModelMode, ModelSpec
from policies.errors import (
    CapabilityNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    QualityNotAllowed,
    UnknownCapability,
    UnknownQualityLevel,
)

AUTO_MODEL = "auto"  # the client lets the gateway pick: the quality level's models in order


@dataclass(frozen=True)
class Route:
    """Where a request may go: candidates in priority order, the first tried first."""

    plan: str
    capability: str
    quality: str
    models: tuple[str, ...]
    requested_model: str | None  # what the client named, when it named one
    max_output_tokens: int | None  # the plan's or capability's cap, if any


def resolve(
    catalog: Catalog,
    *,
    plan: str,
    capability: str,
    quality: str,
    model: str | None,
    mode: ModelMode | None,
    now: datetime,
) -> Route:
    """Check the plan allows the request and list the models it may use.

    `mode` keeps only chat or only embedding models (None: both). A named model must be
    allowed (no silent switch to another); a named model whose `deprecated_at` has passed is
    served by its replacement.
    """
    if capability not in catalog.capabilities:
        raise UnknownCapability(f"unknown capability {capability!r}")
    if quality not in catalog.quality_levels:
        raise UnknownQualityLevel(f"unknown quality level {quality!r}")
    plan_cap = catalog.plans[plan].capabilities.get(capability)
    if plan_cap is None:
        raise CapabilityNotAllowed(
            f"the {plan} plan does not include the {capability} capability",
            _upgrades(catalog, plan, catalog.plans_allowing(capability)),
        )
    if quality not in plan_cap.quality:
        raise QualityNotAllowed(
            f"the {plan} plan does not allow {capability} at the {quality} quality level",
            _upgrades(catalog, plan, catalog.plans_allowing(capability, quality)),
        )
    allowed = tuple(
        m
        for m in catalog.models_for(plan, capability, quality)
        if mode is None or catalog.models[m].mode is mode
    )
    cap = plan_cap.max_output_tokens or catalog.capabilities[capability].max_output_tokens
    if model is None or model == AUTO_MODEL:
        served = (_serving_model(catalog, m, catalog.models[m], now) for m in allowed)
        models = tuple(dict.fromkeys(served))
        requested = None
    else:
        models = (_named_model(catalog, plan, capability, quality, model, allowed, now),)
        requested = model
    return Route(plan, capability, quality, models, requested, cap)


def _named_model(
    catalog: Catalog,
    plan: str,
    capability: str,
    quality: str,
    model: str,
    allowed: tuple[str, ...],
    now: datetime,
) -> str:
    spec = catalog.models.get(model)
    if spec is None:
        raise ModelNotFound(f"the model {model!r} does not exist")
    served = _serving_model(catalog, model, spec, now)
    if served not in allowed and model not in allowed:
        plans = [
            name
            for name in catalog.plans_allowing(capability, quality)
            if served in catalog.models_for(name, capability, quality)
        ]
        raise ModelNotAllowed(
            f"the {plan} plan does not allow {model} for {capability} at {quality}",
            _upgrades(catalog, plan, plans),
        )
    return served


def _serving_model(catalog: Catalog, name: str, spec: ModelSpec, now: datetime) -> str:
    """The model that answers for `name`: its replacement once it is deprecated."""
    seen = {name}
    while spec.deprecated_at is not None and spec.deprecated_at <= now and spec.replacement:
        name = spec.replacement
        if name in seen:  # a cycle of replacements: stop at the last hop
            break
        seen.add(name)
        spec = catalog.models[name]
    return name


def _upgrades(catalog: Catalog, plan: str, plans: list[str]) -> list[str]:
    """The plans above `plan` among `plans`: what an upgrade could buy."""
    rank = catalog.plan_rank(plan)
    return [p for p in plans if catalog.plan_rank(p) > rank]


def allowed_models(catalog: Catalog, plan: str) -> list[str]:
    """Every model a plan may use for some capability and quality, catalog order."""
    usable = {
        model
        for capability, plan_cap in catalog.plans[plan].capabilities.items()
        for quality in plan_cap.quality
        for model in catalog.models_for(plan, capability, quality)
    }
    return [m for m in catalog.models if m in usable]
