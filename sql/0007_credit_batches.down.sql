-- Drop the batches; the single operations of 0004 were left as they were.

DROP FUNCTION credit_settle_batch(uuid[], uuid[], bigint[], text[], text[], numeric[], numeric[],
                                  numeric[], numeric[], integer[], integer[], bigint[], jsonb[]);
DROP FUNCTION credit_reserve_batch(uuid[], text[], bigint[], bigint[], integer[], text[], text[],
                                   text[], text[]);
DROP FUNCTION credit_check_batch(integer[]);
DROP FUNCTION credit_store_balance(organization_credit_balances);
DROP FUNCTION credit_lock_balances(uuid[]);
