ALTER TABLE organization_credit_balances DROP CONSTRAINT organization_credit_balances_rules;
ALTER TABLE credit_reservations DROP CONSTRAINT credit_reservations_rules;
ALTER TABLE credit_transactions DROP CONSTRAINT credit_transactions_rules;
DROP FUNCTION credit_balance_rules(bigint, bigint, bigint, bigint, bigint, bigint, timestamptz,
                                   timestamptz);
DROP FUNCTION credit_reservation_rules(text, text, bigint, bigint, bigint, bigint, timestamptz,
                                       timestamptz, timestamptz);
DROP FUNCTION credit_transaction_rules(text, bigint, bigint, bigint, bigint, text, uuid, integer,
                                       integer, bigint, bigint);

ALTER TABLE organization_credit_balances
    ADD CONSTRAINT organization_credit_balances_monthly_credits_micro_check CHECK (monthly_credits_micro >= 0),
    ADD CONSTRAINT organization_credit_balances_monthly_remaining_micro_check CHECK (monthly_remaining_micro >= 0),
    ADD CONSTRAINT organization_credit_balances_bonus_credits_micro_check CHECK (bonus_credits_micro >= 0),
    ADD CONSTRAINT organization_credit_balances_reserved_credits_micro_check CHECK (reserved_credits_micro >= 0),
    ADD CONSTRAINT organization_credit_balances_overdraft_limit_micro_check CHECK (overdraft_limit_micro >= 0),
    ADD CONSTRAINT organization_credit_balances_overdraft_used_micro_check CHECK (overdraft_used_micro >= 0),
    ADD CONSTRAINT organization_credit_balances_check CHECK (monthly_remaining_micro <= monthly_credits_micro),
    ADD CONSTRAINT organization_credit_balances_check1 CHECK (period_end > period_start);

ALTER TABLE credit_reservations
    ADD CONSTRAINT credit_reservations_idempotency_key_check CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    ADD CONSTRAINT credit_reservations_status_check
        CHECK (status IN ('pending', 'settled', 'released', 'expired', 'rejected')),
    ADD CONSTRAINT credit_reservations_minimum_micro_check CHECK (minimum_micro >= 0),
    ADD CONSTRAINT credit_reservations_requested_micro_check CHECK (requested_micro > 0),
    ADD CONSTRAINT credit_reservations_amount_micro_check CHECK (amount_micro >= 0),
    ADD CONSTRAINT credit_reservations_charged_micro_check CHECK (charged_micro >= 0),
    ADD CONSTRAINT credit_reservations_check CHECK (minimum_micro <= requested_micro),
    ADD CONSTRAINT credit_reservations_check1 CHECK (amount_micro <= requested_micro),
    ADD CONSTRAINT credit_reservations_check2 CHECK (status = 'rejected' OR amount_micro >= minimum_micro),
    ADD CONSTRAINT credit_reservations_check3 CHECK (status <> 'rejected' OR amount_micro = 0),
    ADD CONSTRAINT credit_reservations_check4 CHECK ((status = 'pending') = (resolved_at IS NULL)),
    ADD CONSTRAINT credit_reservations_check5 CHECK ((status = 'settled') = (charged_micro IS NOT NULL)),
    ADD CONSTRAINT credit_reservations_check6 CHECK (expires_at > created_at);

ALTER TABLE credit_transactions
    ADD CONSTRAINT credit_transactions_transaction_type_check CHECK (transaction_type IN (
        'plan_allocation', 'monthly_expiry', 'promo_bonus', 'topup_purchase', 'consumption',
        'plan_change_adjustment', 'admin_adjustment', 'refund')),
    ADD CONSTRAINT credit_transactions_idempotency_key_check CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    ADD CONSTRAINT credit_transactions_prompt_tokens_check CHECK (prompt_tokens >= 0),
    ADD CONSTRAINT credit_transactions_completion_tokens_check CHECK (completion_tokens >= 0),
    ADD CONSTRAINT credit_transactions_reserved_micro_check CHECK (reserved_micro >= 0),
    ADD CONSTRAINT credit_transactions_estimated_credits_micro_check CHECK (estimated_credits_micro >= 0),
    ADD CONSTRAINT credit_transactions_check CHECK (credits_amount_micro = monthly_micro + bonus_micro + overdraft_micro),
    ADD CONSTRAINT credit_transactions_check1 CHECK ((transaction_type = 'consumption') = (reservation_id IS NOT NULL)),
    ADD CONSTRAINT credit_transactions_check2 CHECK (CASE transaction_type
        WHEN 'consumption' THEN credits_amount_micro <= 0
        WHEN 'monthly_expiry' THEN credits_amount_micro < 0 AND bonus_micro = 0 AND overdraft_micro = 0
        WHEN 'refund' THEN credits_amount_micro < 0
        WHEN 'plan_allocation' THEN credits_amount_micro > 0
        WHEN 'promo_bonus' THEN credits_amount_micro > 0
        WHEN 'topup_purchase' THEN credits_amount_micro > 0
        ELSE credits_amount_micro <> 0
    END),
    ADD CONSTRAINT credit_transactions_check3
        CHECK (credits_amount_micro > 0 OR (monthly_micro <= 0 AND bonus_micro <= 0 AND overdraft_micro <= 0)),
    ADD CONSTRAINT credit_transactions_check4
        CHECK (credits_amount_micro < 0 OR (monthly_micro >= 0 AND bonus_micro >= 0 AND overdraft_micro >= 0));
