"""Group commit through the gateway: concurrent calls share ledger batches, and the
gateway_ledger_batch_size histogram accounts for every hold and settlement."""

from __future__ import annotations

import asyncio

import asyncpg
import openai

from gateway.resources import METRICS
from tests.gateway.conftest import Gateway, new_org


async def test_ledger_batch_sizes_add_up_to_the_calls(
    sandbox_gateway: Gateway, pool: asyncpg.Pool
) -> None:
    """Concurrent calls share batches; every hold and settlement is in exactly one."""
    before = batched(sandbox_gateway)
    org = await new_org(pool)
    calls = 24
    async with openai.AsyncOpenAI(
        base_url=sandbox_gateway.v1, api_key=org.key, max_retries=0
    ) as sdk:
        await asyncio.gather(
            *(
                sdk.chat.completions.create(
                    model="auto", messages=[{"role": "user", "content": f"Batch {n}?"}]
                )
                for n in range(calls)
            )
        )
    after = batched(sandbox_gateway)
    for operation in ("reserve", "settle"):
        sent, items = (after[operation][i] - before[operation][i] for i in (0, 1))
        assert items == calls
        assert 1 <= sent <= calls


def batched(gateway: Gateway) -> dict[str, tuple[float, float]]:
    """operation -> (batches, operations in them) so far, from gateway_ledger_batch_size."""
    found: dict[str, list[float]] = {"reserve": [0, 0], "settle": [0, 0]}
    for family in gateway.app[METRICS].registry.collect():
        for sample in family.samples:
            if sample.name == "gateway_ledger_batch_size_count":
                found[sample.labels["operation"]][0] += sample.value
            elif sample.name == "gateway_ledger_batch_size_sum":
                found[sample.labels["operation"]][1] += sample.value
    return {operation: (sent, items) for operation, (sent, items) in found.items()}
