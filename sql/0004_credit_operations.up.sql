-- The credit operations (ADR-023 Phase 4, T7.3-T7.6) as functions: each is one statement,
-- so one round trip and one transaction, safe at READ COMMITTED under any concurrency.
-- Every operation locks the organization's balance row first, then anything else, so the
-- operations of one organization are serialised and never deadlock each other. Every
-- operation takes the organization id as its first argument (Citus can distribute them).
--
-- Errors use SQLSTATE class GL: GL001 invalid argument, GL002 unknown organization,
-- GL003 unknown plan, GL004 idempotency key reused with a different request, GL005 unknown
-- reservation, GL007 plan change not allowed, GL008 ledger immutability, GL009 unknown
-- capability or quality level.

CREATE FUNCTION credit_lock_balance(p_org uuid) RETURNS organization_credit_balances
LANGUAGE plpgsql AS $$
DECLARE
    b organization_credit_balances;
BEGIN
    SELECT * INTO b FROM organization_credit_balances WHERE organization_id = p_org FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown organization %', p_org USING ERRCODE = 'GL002';
    END IF;
    RETURN b;
END $$;

CREATE FUNCTION credit_available(b organization_credit_balances) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT b.monthly_remaining_micro + b.bonus_credits_micro - b.overdraft_used_micro
$$;

CREATE FUNCTION credit_spendable(b organization_credit_balances) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT b.monthly_remaining_micro + b.bonus_credits_micro - b.overdraft_used_micro
           - b.reserved_credits_micro + b.overdraft_limit_micro
$$;

CREATE FUNCTION credit_utc(p_at timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- How an amount moves the three buckets. Credits first repay overdraft, then fill the monthly
-- bucket (allocations, upgrades) or the bonus bucket (everything else). Consumption takes
-- monthly, then bonus, then overdraft; other debits take bonus, then monthly, then overdraft.
CREATE FUNCTION credit_split(b organization_credit_balances, p_type text, p_amount bigint,
                             OUT monthly bigint, OUT bonus bigint, OUT overdraft bigint)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    rest bigint;
BEGIN
    monthly := 0; bonus := 0; overdraft := 0;
    IF p_amount >= 0 THEN
        overdraft := least(b.overdraft_used_micro, p_amount);
        rest := p_amount - overdraft;
        IF p_type IN ('plan_allocation', 'plan_change_adjustment') THEN
            monthly := rest;
        ELSE
            bonus := rest;
        END IF;
    ELSIF p_type = 'monthly_expiry' THEN
        monthly := p_amount;
    ELSIF p_type = 'consumption' THEN
        rest := -p_amount;
        monthly := -least(b.monthly_remaining_micro, rest); rest := rest + monthly;
        bonus := -least(b.bonus_credits_micro, rest);       rest := rest + bonus;
        overdraft := -rest;
    ELSE
        rest := -p_amount;
        bonus := -least(b.bonus_credits_micro, rest);       rest := rest + bonus;
        monthly := -least(b.monthly_remaining_micro, rest); rest := rest + monthly;
        overdraft := -rest;
    END IF;
END $$;

-- Books one ledger entry against a locked balance row and moves the balance with it.
CREATE FUNCTION credit_book(b organization_credit_balances, p_type text, p_amount bigint,
                            p_key text, p_description text, p_metadata jsonb,
                            p_monthly_credits_delta bigint DEFAULT 0)
RETURNS credit_transactions LANGUAGE plpgsql AS $$
DECLARE
    s record;
    t credit_transactions;
BEGIN
    s := credit_split(b, p_type, p_amount);
    UPDATE organization_credit_balances
       SET monthly_credits_micro = monthly_credits_micro + p_monthly_credits_delta,
           monthly_remaining_micro = monthly_remaining_micro + s.monthly,
           bonus_credits_micro = bonus_credits_micro + s.bonus,
           overdraft_used_micro = overdraft_used_micro - s.overdraft
     WHERE organization_id = b.organization_id;
    INSERT INTO credit_transactions (organization_id, transaction_type, credits_amount_micro,
                                     monthly_micro, bonus_micro, overdraft_micro,
                                     idempotency_key, description, provider_metadata)
    VALUES (b.organization_id, p_type, p_amount, s.monthly, s.bonus, s.overdraft,
            p_key, p_description, p_metadata)
    RETURNING * INTO t;
    RETURN t;
END $$;

CREATE FUNCTION credit_check_key(p_key text) RETURNS void LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF p_key IS NULL OR length(p_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'an idempotency key of 1 to 255 characters is required' USING ERRCODE = 'GL001';
    END IF;
END $$;

-- Grants, top-ups, promotions, refunds and admin adjustments: idempotent by key.
CREATE FUNCTION credit_post(p_org uuid, p_type text, p_amount bigint, p_key text,
                            p_description text DEFAULT NULL, p_metadata jsonb DEFAULT NULL)
RETURNS TABLE (txn credit_transactions, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    b organization_credit_balances;
    t credit_transactions;
BEGIN
    IF p_type IS NULL OR p_type NOT IN ('promo_bonus', 'topup_purchase', 'admin_adjustment', 'refund') THEN
        RAISE EXCEPTION 'cannot post a % entry directly', coalesce(p_type, 'null') USING ERRCODE = 'GL001';
    END IF;
    IF p_amount IS NULL OR p_amount = 0
       OR (p_type IN ('promo_bonus', 'topup_purchase') AND p_amount < 0)
       OR (p_type = 'refund' AND p_amount > 0) THEN
        RAISE EXCEPTION 'invalid amount % for a % entry', p_amount, p_type USING ERRCODE = 'GL001';
    END IF;
    PERFORM credit_check_key(p_key);
    -- the ledger's own keys are never a caller's: a clash would block a reset or a settle
    IF p_key = 'welcome_bonus'
       OR p_key ~ '^(plan_allocation|monthly_expiry|consumption|plan_change):' THEN
        RAISE EXCEPTION 'idempotency key % is reserved by the ledger', p_key
            USING ERRCODE = 'GL001';
    END IF;
    b := credit_lock_balance(p_org);
    SELECT * INTO t FROM credit_transactions
     WHERE organization_id = p_org AND idempotency_key = p_key;
    IF FOUND THEN
        IF t.transaction_type <> p_type OR t.credits_amount_micro <> p_amount THEN
            RAISE EXCEPTION 'idempotency key % was used for a different entry', p_key
                USING ERRCODE = 'GL004';
        END IF;
        RETURN QUERY SELECT t, true;
        RETURN;
    END IF;
    t := credit_book(b, p_type, p_amount, p_key, p_description, p_metadata);
    RETURN QUERY SELECT t, false;
END $$;

-- Holds credits before a call: at least p_minimum, up to p_requested, never more than the
-- spendable balance. Refused holds are remembered as 'rejected', so a retry with the same
-- key stays refused; a retry of a granted hold gets the same reservation back.
CREATE FUNCTION credit_reserve(p_org uuid, p_key text, p_minimum bigint, p_requested bigint,
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
CREATE FUNCTION credit_settle(p_org uuid, p_reservation uuid, p_charge bigint,
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

-- Gives a hold back: 'released' after a failed call, or 'expired' when the hold outlived its
-- ttl (only once expires_at <= p_now). Idempotent: a resolved hold is reported, not changed.
CREATE FUNCTION credit_release(p_org uuid, p_reservation uuid, p_reason text DEFAULT NULL,
                               p_expire boolean DEFAULT false, p_now timestamptz DEFAULT now())
RETURNS TABLE (status text, applied boolean, amount_micro bigint, available_micro bigint,
               spendable_micro bigint)
LANGUAGE plpgsql AS $$
DECLARE
    b organization_credit_balances;
    r credit_reservations;
BEGIN
    b := credit_lock_balance(p_org);
    UPDATE credit_reservations cr
       SET status = CASE WHEN p_expire THEN 'expired' ELSE 'released' END,
           release_reason = p_reason, resolved_at = now()
     WHERE cr.organization_id = p_org AND cr.id = p_reservation AND cr.status = 'pending'
       AND (NOT p_expire OR cr.expires_at <= p_now)
    RETURNING * INTO r;
    IF NOT FOUND THEN
        SELECT * INTO r FROM credit_reservations cr
         WHERE cr.organization_id = p_org AND cr.id = p_reservation;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown reservation %', p_reservation USING ERRCODE = 'GL005';
        END IF;
        RETURN QUERY SELECT r.status, false, r.amount_micro, credit_available(b),
                            credit_spendable(b);
        RETURN;
    END IF;
    UPDATE organization_credit_balances
       SET reserved_credits_micro = reserved_credits_micro - r.amount_micro
     WHERE organization_id = p_org
    RETURNING * INTO b;
    RETURN QUERY SELECT r.status, true, r.amount_micro, credit_available(b), credit_spendable(b);
END $$;

-- Creates an organization on a plan: its plan row, its balance for the first period, the
-- period's allocation and the plan's welcome bonus. Idempotent by organization id.
CREATE FUNCTION credit_create_organization(p_id uuid, p_name text, p_plan text,
                                           p_now timestamptz DEFAULT now())
RETURNS TABLE (organization_id uuid, created_at timestamptz, replayed boolean)
LANGUAGE plpgsql SET TimeZone = 'UTC' AS $$
DECLARE
    v_plan plans;
    v_org organizations;
    b organization_credit_balances;
BEGIN
    IF p_name IS NULL OR length(btrim(p_name)) = 0 OR length(p_name) > 200 THEN
        RAISE EXCEPTION 'an organization name of 1 to 200 characters is required' USING ERRCODE = 'GL001';
    END IF;
    SELECT * INTO v_plan FROM plans WHERE unique_name = p_plan AND is_active;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown plan %', p_plan USING ERRCODE = 'GL003';
    END IF;
    INSERT INTO organizations (id, name, created_at) VALUES (p_id, p_name, p_now)
    ON CONFLICT (id) DO NOTHING
    RETURNING * INTO v_org;
    IF NOT FOUND THEN
        SELECT o.* INTO v_org FROM organizations o WHERE o.id = p_id;
        RETURN QUERY SELECT v_org.id, v_org.created_at, true;
        RETURN;
    END IF;
    INSERT INTO organization_plans (organization_id, plan_id, monthly_ai_credits_micro)
    VALUES (p_id, v_plan.id, v_plan.monthly_ai_credits_micro);
    INSERT INTO organization_credit_balances (organization_id, monthly_credits_micro,
        overdraft_limit_micro, billing_anchor, period_start, period_end)
    VALUES (p_id, v_plan.monthly_ai_credits_micro, v_plan.overdraft_limit_micro, p_now, p_now,
            p_now + interval '1 month');
    IF v_plan.monthly_ai_credits_micro > 0 THEN
        b := credit_lock_balance(p_id);
        PERFORM credit_book(b, 'plan_allocation', v_plan.monthly_ai_credits_micro,
                            'plan_allocation:' || credit_utc(p_now),
                            'Monthly allocation of the ' || v_plan.unique_name || ' plan', NULL);
    END IF;
    IF v_plan.welcome_bonus_micro > 0 THEN
        b := credit_lock_balance(p_id);
        PERFORM credit_book(b, 'promo_bonus', v_plan.welcome_bonus_micro, 'welcome_bonus',
                            'Welcome bonus of the ' || v_plan.unique_name || ' plan', NULL);
    END IF;
    RETURN QUERY SELECT v_org.id, v_org.created_at, false;
END $$;

-- Ends a period once period_end <= p_now: the leftover monthly credits expire, a scheduled
-- downgrade takes effect, and the period containing p_now gets the plan's allocation.
-- Bonus credits and pending holds carry over. Idempotent: a current period is left alone.
CREATE FUNCTION credit_reset_period(p_org uuid, p_now timestamptz DEFAULT now())
RETURNS TABLE (reset boolean, expired_micro bigint, allocated_micro bigint, plan text,
               period_start timestamptz, period_end timestamptz)
LANGUAGE plpgsql SET TimeZone = 'UTC' AS $$
DECLARE
    b organization_credit_balances;
    op organization_plans;
    v_plan plans;
    v_expired bigint := 0;
    n integer;
BEGIN
    b := credit_lock_balance(p_org);
    SELECT * INTO op FROM organization_plans WHERE organization_id = p_org FOR UPDATE;
    IF b.period_end > p_now THEN
        SELECT * INTO v_plan FROM plans WHERE id = op.plan_id;
        RETURN QUERY SELECT false, 0::bigint, 0::bigint, v_plan.unique_name, b.period_start, b.period_end;
        RETURN;
    END IF;
    IF b.monthly_remaining_micro > 0 THEN
        v_expired := b.monthly_remaining_micro;
        PERFORM credit_book(b, 'monthly_expiry', -v_expired,
                            'monthly_expiry:' || credit_utc(b.period_end),
                            'Unused monthly credits expired at the end of the period', NULL);
    END IF;
    IF op.pending_plan_id IS NOT NULL AND op.pending_change_at <= p_now THEN
        UPDATE organization_plans o
           SET plan_id = o.pending_plan_id, pending_plan_id = NULL, pending_change_at = NULL,
               monthly_ai_credits_micro = (SELECT p.monthly_ai_credits_micro FROM plans p
                                            WHERE p.id = o.pending_plan_id)
         WHERE o.organization_id = p_org
        RETURNING * INTO op;
    END IF;
    SELECT * INTO v_plan FROM plans WHERE id = op.plan_id;
    -- the period containing p_now, in whole months from the billing anchor
    n := ((extract(year FROM p_now) - extract(year FROM b.billing_anchor)) * 12
          + extract(month FROM p_now) - extract(month FROM b.billing_anchor))::integer;
    WHILE b.billing_anchor + make_interval(months => n) > p_now LOOP n := n - 1; END LOOP;
    WHILE b.billing_anchor + make_interval(months => n + 1) <= p_now LOOP n := n + 1; END LOOP;
    UPDATE organization_credit_balances
       SET period_start = billing_anchor + make_interval(months => n),
           period_end = billing_anchor + make_interval(months => n + 1),
           monthly_credits_micro = v_plan.monthly_ai_credits_micro,
           overdraft_limit_micro = v_plan.overdraft_limit_micro
     WHERE organization_id = p_org
    RETURNING * INTO b;
    IF v_plan.monthly_ai_credits_micro > 0 THEN
        PERFORM credit_book(b, 'plan_allocation', v_plan.monthly_ai_credits_micro,
                            'plan_allocation:' || credit_utc(b.period_start),
                            'Monthly allocation of the ' || v_plan.unique_name || ' plan', NULL);
    END IF;
    RETURN QUERY SELECT true, v_expired, v_plan.monthly_ai_credits_micro, v_plan.unique_name,
                        b.period_start, b.period_end;
END $$;

-- An upgrade takes effect at once, with a plan_change_adjustment for the full difference in
-- monthly allocation (no proration). A downgrade is scheduled for the end of the period and
-- changes nothing else until then. p_direction, when given, must match the move.
CREATE FUNCTION credit_change_plan(p_org uuid, p_plan text, p_direction text DEFAULT NULL,
                                   p_now timestamptz DEFAULT now())
RETURNS TABLE (change text, plan text, effective_at timestamptz, transaction_id bigint,
               adjustment_micro bigint)
LANGUAGE plpgsql AS $$
DECLARE
    b organization_credit_balances;
    op organization_plans;
    v_current plans;
    v_new plans;
    v_diff bigint := 0;
    t credit_transactions;
BEGIN
    IF p_direction IS NOT NULL AND p_direction NOT IN ('upgrade', 'downgrade') THEN
        RAISE EXCEPTION 'direction must be upgrade or downgrade, not %', p_direction
            USING ERRCODE = 'GL001';
    END IF;
    b := credit_lock_balance(p_org);
    IF b.period_end <= p_now THEN  -- a period that has ended is reset before the change
        PERFORM credit_reset_period(p_org, p_now);
        b := credit_lock_balance(p_org);
    END IF;
    SELECT * INTO v_new FROM plans WHERE unique_name = p_plan AND is_active;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown plan %', p_plan USING ERRCODE = 'GL003';
    END IF;
    SELECT * INTO op FROM organization_plans WHERE organization_id = p_org FOR UPDATE;
    SELECT * INTO v_current FROM plans WHERE id = op.plan_id;
    IF v_new.id = op.plan_id THEN
        IF op.pending_plan_id IS NULL OR p_direction IS NOT NULL THEN
            RAISE EXCEPTION 'the organization is already on the % plan', p_plan USING ERRCODE = 'GL007';
        END IF;
        UPDATE organization_plans SET pending_plan_id = NULL, pending_change_at = NULL
         WHERE organization_id = p_org;
        RETURN QUERY SELECT 'downgrade_cancelled'::text, p_plan, p_now, NULL::bigint, 0::bigint;
        RETURN;
    END IF;
    IF v_new.display_order > v_current.display_order THEN
        IF p_direction = 'downgrade' THEN
            RAISE EXCEPTION 'moving from % to % is an upgrade', v_current.unique_name, p_plan
                USING ERRCODE = 'GL007';
        END IF;
        UPDATE organization_plans
           SET plan_id = v_new.id, monthly_ai_credits_micro = v_new.monthly_ai_credits_micro,
               pending_plan_id = NULL, pending_change_at = NULL
         WHERE organization_id = p_org;
        UPDATE organization_credit_balances SET overdraft_limit_micro = v_new.overdraft_limit_micro
         WHERE organization_id = p_org
        RETURNING * INTO b;
        v_diff := v_new.monthly_ai_credits_micro - v_current.monthly_ai_credits_micro;
        IF v_diff > 0 THEN
            t := credit_book(b, 'plan_change_adjustment', v_diff,
                             'plan_change:' || v_current.unique_name || '->' || v_new.unique_name
                                 || ':' || credit_utc(b.period_start),
                             'Upgrade from ' || v_current.unique_name || ' to ' || v_new.unique_name,
                             NULL, v_diff);
        END IF;
        RETURN QUERY SELECT 'upgraded'::text, p_plan, p_now, t.id, greatest(v_diff, 0);
        RETURN;
    END IF;
    IF p_direction = 'upgrade' THEN
        RAISE EXCEPTION 'moving from % to % is a downgrade', v_current.unique_name, p_plan
            USING ERRCODE = 'GL007';
    END IF;
    UPDATE organization_plans SET pending_plan_id = v_new.id, pending_change_at = b.period_end
     WHERE organization_id = p_org;
    RETURN QUERY SELECT 'downgrade_scheduled'::text, p_plan, b.period_end, NULL::bigint, 0::bigint;
END $$;
