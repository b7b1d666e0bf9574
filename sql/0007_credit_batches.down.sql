-- Back to the single operations of 0004, then drop the batches.

-- Holds credits before a call: at least p_minimum, up to p_requested, never more than the
-- spendable balance. Refused holds are remembered as 'rejected', so a retry with the same
-- key stays refused; a retry of a granted hold gets the same reservation back.
CREATE OR REPLACE FUNCTION credit_reserve(p_org uuid, p_key text, p_minimum bigint, p_requested bigint,
                               p_ttl_s integer, p_capability text DEFAULT NULL,
                               p_quality text DEFAULT NULL, p_model text DEFAULT NULL,
                               p_request_id text DEFAULT NULL)
RETURNS TABLE (reservation_id uuid, status text, amount_micro bigint, spendable_micro bigint,
               expires_at timestamptz, replayed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    b organization_credit_balances;
    r credit_reservations;
    v_capability integer;
    v_quality integer;
    v_spendable bigint;
    v_hold bigint := 0;
    v_status text := 'rejected';
BEGIN
    IF p_minimum IS NULL OR p_requested IS NULL OR p_minimum < 0 OR p_requested <= 0
       OR p_minimum > p_requested THEN
        RAISE EXCEPTION 'invalid reservation amounts: minimum %, requested %', p_minimum, p_requested
            USING ERRCODE = 'GL001';
    END IF;
    IF p_ttl_s IS NULL OR p_ttl_s <= 0 THEN
        RAISE EXCEPTION 'invalid reservation ttl %', p_ttl_s USING ERRCODE = 'GL001';
    END IF;
    PERFORM credit_check_key(p_key);
    IF p_capability IS NOT NULL THEN
        SELECT id INTO v_capability FROM ai_capabilities WHERE unique_name = p_capability;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown capability %', p_capability USING ERRCODE = 'GL009';
        END IF;
    END IF;
    IF p_quality IS NOT NULL THEN
        SELECT id INTO v_quality FROM quality_levels WHERE unique_name = p_quality;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown quality level %', p_quality USING ERRCODE = 'GL009';
        END IF;
    END IF;
    b := credit_lock_balance(p_org);
    v_spendable := credit_spendable(b);
    SELECT * INTO r FROM credit_reservations cr
     WHERE cr.organization_id = p_org AND cr.idempotency_key = p_key;
    IF FOUND THEN
        IF r.minimum_micro <> p_minimum OR r.requested_micro <> p_requested THEN
            RAISE EXCEPTION 'idempotency key % was used for a different reservation', p_key
                USING ERRCODE = 'GL004';
        END IF;
        RETURN QUERY SELECT r.id, r.status, r.amount_micro, v_spendable, r.expires_at, true;
        RETURN;
    END IF;
    IF v_spendable >= p_minimum THEN
        v_hold := least(p_requested, v_spendable);
        v_status := 'pending';
        UPDATE organization_credit_balances
           SET reserved_credits_micro = reserved_credits_micro + v_hold
         WHERE organization_id = p_org;
    END IF;
    INSERT INTO credit_reservations (organization_id, idempotency_key, status, minimum_micro,
                                     requested_micro, amount_micro, ai_capability_id,
                                     quality_level_id, model, request_id, expires_at, resolved_at)
    VALUES (p_org, p_key, v_status, p_minimum, p_requested, v_hold, v_capability, v_quality,
            p_model, p_request_id, now() + make_interval(secs => p_ttl_s),
            CASE WHEN v_status = 'rejected' THEN now() END)
    RETURNING * INTO r;
    RETURN QUERY SELECT r.id, r.status, r.amount_micro, v_spendable - v_hold, r.expires_at, false;
END $$;

-- Charges a call from the usage the upstream reported and gives back the rest of the hold.
-- A charge above the hold (an upstream that misreports) is booked all the same: it draws on
-- the overdraft and the entry's overage_micro records it.
CREATE OR REPLACE FUNCTION credit_settle(p_org uuid, p_reservation uuid, p_charge bigint,
                              p_model text DEFAULT NULL, p_provider text DEFAULT NULL,
                              p_input_usd_per_mtok numeric DEFAULT NULL,
                              p_output_usd_per_mtok numeric DEFAULT NULL,
                              p_credit_multiplier numeric DEFAULT NULL,
                              p_credits_per_usd numeric DEFAULT NULL,
                              p_prompt_tokens integer DEFAULT NULL,
                              p_completion_tokens integer DEFAULT NULL,
                              p_estimated_micro bigint DEFAULT NULL,
                              p_metadata jsonb DEFAULT NULL)
RETURNS TABLE (status text, applied boolean, transaction_id bigint, charged_micro bigint,
               available_micro bigint, spendable_micro bigint, monthly_credits_micro bigint)
LANGUAGE plpgsql AS $$
DECLARE
    b organization_credit_balances;
    r credit_reservations;
    s record;
    v_txn bigint;
BEGIN
    IF p_charge IS NULL OR p_charge < 0 THEN
        RAISE EXCEPTION 'invalid charge %', p_charge USING ERRCODE = 'GL001';
    END IF;
    b := credit_lock_balance(p_org);
    UPDATE credit_reservations cr
       SET status = 'settled', charged_micro = p_charge, resolved_at = now()
     WHERE cr.organization_id = p_org AND cr.id = p_reservation AND cr.status = 'pending'
    RETURNING * INTO r;
    IF NOT FOUND THEN
        SELECT * INTO r FROM credit_reservations cr
         WHERE cr.organization_id = p_org AND cr.id = p_reservation;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown reservation %', p_reservation USING ERRCODE = 'GL005';
        END IF;
        IF r.status = 'settled' AND r.charged_micro <> p_charge THEN
            RAISE EXCEPTION 'reservation % was settled for a different amount', p_reservation
                USING ERRCODE = 'GL004';
        END IF;
        SELECT t.id INTO v_txn FROM credit_transactions t
         WHERE t.organization_id = p_org AND t.reservation_id = p_reservation;
        RETURN QUERY SELECT r.status, false, v_txn, r.charged_micro, credit_available(b),
                            credit_spendable(b), b.monthly_credits_micro;
        RETURN;
    END IF;
    s := credit_split(b, 'consumption', -p_charge);
    UPDATE organization_credit_balances
       SET reserved_credits_micro = reserved_credits_micro - r.amount_micro,
           monthly_remaining_micro = monthly_remaining_micro + s.monthly,
           bonus_credits_micro = bonus_credits_micro + s.bonus,
           overdraft_used_micro = overdraft_used_micro - s.overdraft
     WHERE organization_id = p_org
    RETURNING * INTO b;
    INSERT INTO credit_transactions (organization_id, transaction_type, credits_amount_micro,
        monthly_micro, bonus_micro, overdraft_micro, idempotency_key, reservation_id,
        ai_capability_id, quality_level_id, model, provider, input_usd_per_mtok,
        output_usd_per_mtok, credit_multiplier, credits_per_usd, prompt_tokens,
        completion_tokens, reserved_micro, estimated_credits_micro, provider_metadata)
    VALUES (p_org, 'consumption', -p_charge, s.monthly, s.bonus, s.overdraft,
            'consumption:' || r.id::text, r.id, r.ai_capability_id, r.quality_level_id,
            coalesce(p_model, r.model), p_provider, p_input_usd_per_mtok, p_output_usd_per_mtok,
            p_credit_multiplier, p_credits_per_usd, p_prompt_tokens, p_completion_tokens,
            r.amount_micro, p_estimated_micro, p_metadata)
    RETURNING id INTO v_txn;
    RETURN QUERY SELECT 'settled'::text, true, v_txn, p_charge, credit_available(b),
                        credit_spendable(b), b.monthly_credits_micro;
END $$;

DROP FUNCTION credit_settle_batch(uuid[], uuid[], bigint[], text[], text[], numeric[], numeric[],
                                  numeric[], numeric[], integer[], integer[], bigint[], jsonb[]);
DROP FUNCTION credit_reserve_batch(uuid[], text[], bigint[], bigint[], integer[], text[], text[],
                                   text[], text[]);
DROP FUNCTION credit_check_batch(integer[]);
DROP FUNCTION credit_store_balance(organization_credit_balances);
DROP FUNCTION credit_lock_balances(uuid[]);
