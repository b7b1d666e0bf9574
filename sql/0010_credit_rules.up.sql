-- The ledger tables' CHECK constraints, each table's folded into one PL/pgSQL function.
--
-- PostgreSQL stores a CHECK constraint as an expression tree in text form, and every INSERT
-- or UPDATE statement parses and plans each of its table's constraints again before its
-- first row: nothing keeps them across statements. These three tables are written by every
-- metered call (a hold, a settlement, their balance), and that work was about a fifth of the
-- server's CPU per hold + settlement. A call of a function is a tree of a few nodes, and
-- PL/pgSQL keeps a function's compiled body for the session. The rules are the same ones,
-- checked on every row written; a row that breaks one is refused with check_violation
-- (23514) as before, and the message names the rule. A rule on NULL columns passes, as in a
-- CHECK: every rule is written as IF NOT (the old constraint's expression).

CREATE FUNCTION credit_balance_rules(p_monthly_credits bigint, p_monthly_remaining bigint,
                                     p_bonus bigint, p_reserved bigint,
                                     p_overdraft_limit bigint, p_overdraft_used bigint,
                                     p_period_start timestamptz, p_period_end timestamptz)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF NOT (p_monthly_credits >= 0 AND p_monthly_remaining >= 0 AND p_bonus >= 0
            AND p_reserved >= 0 AND p_overdraft_limit >= 0 AND p_overdraft_used >= 0) THEN
        RAISE EXCEPTION 'organization_credit_balances: an amount is negative'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (p_monthly_remaining <= p_monthly_credits) THEN
        RAISE EXCEPTION 'organization_credit_balances: monthly_remaining_micro exceeds monthly_credits_micro'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (p_period_end > p_period_start) THEN
        RAISE EXCEPTION 'organization_credit_balances: period_end is not after period_start'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION credit_reservation_rules(p_key text, p_status text, p_minimum bigint,
                                         p_requested bigint, p_amount bigint, p_charged bigint,
                                         p_resolved_at timestamptz, p_expires_at timestamptz,
                                         p_created_at timestamptz)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF NOT (p_status IN ('pending', 'settled', 'released', 'expired', 'rejected')) THEN
        RAISE EXCEPTION 'credit_reservations: unknown status %', p_status
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (length(p_key) BETWEEN 1 AND 255) THEN
        RAISE EXCEPTION 'credit_reservations: idempotency_key must have 1 to 255 characters'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (p_minimum >= 0 AND p_requested > 0 AND p_amount >= 0 AND p_charged >= 0) THEN
        RAISE EXCEPTION 'credit_reservations: an amount is negative (or requested_micro is 0)'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (p_minimum <= p_requested AND p_amount <= p_requested) THEN
        RAISE EXCEPTION 'credit_reservations: minimum_micro or amount_micro exceeds requested_micro'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT ((p_status = 'rejected' OR p_amount >= p_minimum)
            AND (p_status <> 'rejected' OR p_amount = 0)) THEN
        RAISE EXCEPTION 'credit_reservations: a hold is at least its minimum, a rejected one 0'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT ((p_status = 'pending') = (p_resolved_at IS NULL)) THEN
        RAISE EXCEPTION 'credit_reservations: resolved_at is set exactly when not pending'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT ((p_status = 'settled') = (p_charged IS NOT NULL)) THEN
        RAISE EXCEPTION 'credit_reservations: charged_micro is set exactly when settled'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (p_expires_at > p_created_at) THEN
        RAISE EXCEPTION 'credit_reservations: expires_at is not after created_at'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END $$;

CREATE FUNCTION credit_transaction_rules(p_type text, p_amount bigint, p_monthly bigint,
                                         p_bonus bigint, p_overdraft bigint, p_key text,
                                         p_reservation uuid, p_prompt_tokens integer,
                                         p_completion_tokens integer, p_reserved bigint,
                                         p_estimated bigint)
RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF NOT (p_type IN ('plan_allocation', 'monthly_expiry', 'promo_bonus', 'topup_purchase',
                       'consumption', 'plan_change_adjustment', 'admin_adjustment', 'refund')) THEN
        RAISE EXCEPTION 'credit_transactions: unknown transaction_type %', p_type
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (length(p_key) BETWEEN 1 AND 255) THEN
        RAISE EXCEPTION 'credit_transactions: idempotency_key must have 1 to 255 characters'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (p_prompt_tokens >= 0 AND p_completion_tokens >= 0 AND p_reserved >= 0
            AND p_estimated >= 0) THEN
        RAISE EXCEPTION 'credit_transactions: a token count or snapshot amount is negative'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (p_amount = p_monthly + p_bonus + p_overdraft) THEN
        RAISE EXCEPTION 'credit_transactions: credits_amount_micro is not monthly + bonus + overdraft'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT ((p_type = 'consumption') = (p_reservation IS NOT NULL)) THEN
        RAISE EXCEPTION 'credit_transactions: a reservation_id is set exactly on consumption'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT (CASE p_type
                WHEN 'consumption' THEN p_amount <= 0
                WHEN 'monthly_expiry' THEN p_amount < 0 AND p_bonus = 0 AND p_overdraft = 0
                WHEN 'refund' THEN p_amount < 0
                WHEN 'plan_allocation' THEN p_amount > 0
                WHEN 'promo_bonus' THEN p_amount > 0
                WHEN 'topup_purchase' THEN p_amount > 0
                ELSE p_amount <> 0
            END) THEN
        RAISE EXCEPTION 'credit_transactions: amount % has the wrong sign for %', p_amount, p_type
            USING ERRCODE = 'check_violation';
    END IF;
    -- a debit never adds to a bucket, a credit never takes from one
    IF NOT ((p_amount > 0 OR (p_monthly <= 0 AND p_bonus <= 0 AND p_overdraft <= 0))
            AND (p_amount < 0 OR (p_monthly >= 0 AND p_bonus >= 0 AND p_overdraft >= 0))) THEN
        RAISE EXCEPTION 'credit_transactions: a bucket moves against the amount''s sign'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN true;
END $$;

DO $$
DECLARE
    c record;
BEGIN
    FOR c IN SELECT conrelid::regclass AS rel, conname FROM pg_constraint
              WHERE contype = 'c' AND conrelid IN ('organization_credit_balances'::regclass,
                    'credit_reservations'::regclass, 'credit_transactions'::regclass) LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.rel, c.conname);
    END LOOP;
END $$;

ALTER TABLE organization_credit_balances ADD CONSTRAINT organization_credit_balances_rules
    CHECK (credit_balance_rules(monthly_credits_micro, monthly_remaining_micro,
                                bonus_credits_micro, reserved_credits_micro,
                                overdraft_limit_micro, overdraft_used_micro, period_start,
                                period_end));
ALTER TABLE credit_reservations ADD CONSTRAINT credit_reservations_rules
    CHECK (credit_reservation_rules(idempotency_key, status, minimum_micro, requested_micro,
                                    amount_micro, charged_micro, resolved_at, expires_at,
                                    created_at));
ALTER TABLE credit_transactions ADD CONSTRAINT credit_transactions_rules
    CHECK (credit_transaction_rules(transaction_type, credits_amount_micro, monthly_micro,
                                    bonus_micro, overdraft_micro, idempotency_key,
                                    reservation_id, prompt_tokens, completion_tokens,
                                    reserved_micro, estimated_credits_micro));
