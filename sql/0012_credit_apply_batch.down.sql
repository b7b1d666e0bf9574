DROP FUNCTION credit_apply_batch(uuid[], uuid[], bigint[], text[], text[], numeric[], numeric[],
                                 numeric[], numeric[], integer[], integer[], bigint[], jsonb[],
                                 uuid[], text[], bigint[], bigint[], integer[], text[], text[],
                                 text[], text[]);
