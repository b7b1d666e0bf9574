-- A worker's queued settlements and holds in one statement and one transaction.
--
-- Group commit (0007) sent the holds waiting and the settlements waiting as two batches,
-- two transactions, two commits, and on a busy organization two updates of its balance row
-- for one turn of calls. Here both go together when both are waiting: the organizations of
-- both are locked first, in order (so no batch or single operation can deadlock with it),
-- then the settlements are applied (the credits they give back are there for the holds),
-- then the holds, each exactly as credit_settle_batch and credit_reserve_batch apply them.
-- Each row is one item's outcome: `kind` says which, `ord` its place among its kind's
-- arrays, and the columns of the other kind are NULL.

CREATE FUNCTION credit_apply_batch(s_org uuid[], s_reservation uuid[], s_charge bigint[],
                                   s_model text[], s_provider text[],
                                   s_input_usd_per_mtok numeric[],
                                   s_output_usd_per_mtok numeric[],
                                   s_credit_multiplier numeric[], s_credits_per_usd numeric[],
                                   s_prompt_tokens integer[], s_completion_tokens integer[],
                                   s_estimated_micro bigint[], s_metadata jsonb[],
                                   r_org uuid[], r_key text[], r_minimum bigint[],
                                   r_requested bigint[], r_ttl_s integer[],
                                   r_capability text[], r_quality text[], r_model text[],
                                   r_request_id text[])
RETURNS TABLE (kind text, ord integer, status text, applied boolean, transaction_id bigint,
               charged_micro bigint, available_micro bigint, spendable_micro bigint,
               monthly_credits_micro bigint, reservation_id uuid, amount_micro bigint,
               expires_at timestamptz, replayed boolean, error_code text, error_message text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM credit_lock_balances(s_org || r_org);
    RETURN QUERY
    SELECT 'settle'::text, s.ord, s.status, s.applied, s.transaction_id, s.charged_micro,
           s.available_micro, s.spendable_micro, s.monthly_credits_micro, NULL::uuid,
           NULL::bigint, NULL::timestamptz, NULL::boolean, s.error_code, s.error_message
      FROM credit_settle_batch(s_org, s_reservation, s_charge, s_model, s_provider,
                               s_input_usd_per_mtok, s_output_usd_per_mtok, s_credit_multiplier,
                               s_credits_per_usd, s_prompt_tokens, s_completion_tokens,
                               s_estimated_micro, s_metadata) AS s;
    RETURN QUERY
    SELECT 'reserve'::text, r.ord, r.status, NULL::boolean, NULL::bigint, NULL::bigint,
           NULL::bigint, r.spendable_micro, NULL::bigint, r.reservation_id, r.amount_micro,
           r.expires_at, r.replayed, r.error_code, r.error_message
      FROM credit_reserve_batch(r_org, r_key, r_minimum, r_requested, r_ttl_s, r_capability,
                                r_quality, r_model, r_request_id) AS r;
END $$;
