-- Credits (ADR-023 Phase 2): balances, the append-only ledger, reservations, notification
-- debounce. Every table carries organization_id and every key starts with it, so the
-- tables can be distributed by organization_id on Citus without code changes.

-- Amounts are integer micro-credits (1 credit = 1 000 000). A balance is kept in three
-- buckets; every ledger entry records how it moved each one, so that for every organization
--   monthly_remaining_micro  = sum(monthly_micro)
--   bonus_credits_micro      = sum(bonus_micro)
--   -overdraft_used_micro    = sum(overdraft_micro)
-- and therefore available (monthly + bonus - overdraft used) = sum(credits_amount_micro).
CREATE TABLE organization_credit_balances (
    organization_id         uuid PRIMARY KEY REFERENCES organizations (id),
    monthly_credits_micro   bigint NOT NULL CHECK (monthly_credits_micro >= 0),  -- this period's allocation
    monthly_remaining_micro bigint NOT NULL DEFAULT 0 CHECK (monthly_remaining_micro >= 0),
    bonus_credits_micro     bigint NOT NULL DEFAULT 0 CHECK (bonus_credits_micro >= 0),
    reserved_credits_micro  bigint NOT NULL DEFAULT 0 CHECK (reserved_credits_micro >= 0),
    overdraft_limit_micro   bigint NOT NULL DEFAULT 0 CHECK (overdraft_limit_micro >= 0),
    overdraft_used_micro    bigint NOT NULL DEFAULT 0 CHECK (overdraft_used_micro >= 0),
    billing_anchor          timestamptz NOT NULL,  -- periods are whole months from here
    period_start            timestamptz NOT NULL,
    period_end              timestamptz NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CHECK (monthly_remaining_micro <= monthly_credits_micro),
    CHECK (period_end > period_start)
);
CREATE INDEX organization_credit_balances_period_end_idx
    ON organization_credit_balances (period_end);

CREATE TABLE credit_reservations (
    id               uuid NOT NULL DEFAULT gen_random_uuid(),
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- rejected: refused for want of credits, remembered so that a retry stays refused
    status           text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'settled', 'released', 'expired', 'rejected')),
    minimum_micro    bigint NOT NULL CHECK (minimum_micro >= 0),   -- asked: at least this
    requested_micro  bigint NOT NULL CHECK (requested_micro > 0),  -- asked: at most this
    amount_micro     bigint NOT NULL CHECK (amount_micro >= 0),    -- held
    charged_micro    bigint CHECK (charged_micro >= 0),            -- settled for
    ai_capability_id integer REFERENCES ai_capabilities (id),
    quality_level_id integer REFERENCES quality_levels (id),
    model            text,
    request_id       text,
    release_reason   text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    resolved_at      timestamptz,
    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, idempotency_key),
    CHECK (minimum_micro <= requested_micro),
    CHECK (amount_micro <= requested_micro),
    CHECK (status = 'rejected' OR amount_micro >= minimum_micro),
    CHECK (status <> 'rejected' OR amount_micro = 0),
    CHECK ((status = 'pending') = (resolved_at IS NULL)),
    CHECK ((status = 'settled') = (charged_micro IS NOT NULL)),
    CHECK (expires_at > created_at)
);
CREATE INDEX credit_reservations_pending_expiry_idx ON credit_reservations (expires_at)
    WHERE status = 'pending';

-- A reservation leaves 'pending' once and is never changed again.
CREATE FUNCTION credit_reservations_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'credit reservations are never deleted' USING ERRCODE = 'GL008';
    END IF;
    IF OLD.status <> 'pending' THEN
        RAISE EXCEPTION 'reservation % is already %', OLD.id, OLD.status USING ERRCODE = 'GL008';
    END IF;
    IF NEW.organization_id <> OLD.organization_id OR NEW.amount_micro <> OLD.amount_micro
       OR NEW.idempotency_key <> OLD.idempotency_key THEN
        RAISE EXCEPTION 'reservation % may only change its status', OLD.id USING ERRCODE = 'GL008';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER credit_reservations_guard BEFORE UPDATE OR DELETE ON credit_reservations
    FOR EACH ROW EXECUTE FUNCTION credit_reservations_guard();

CREATE TABLE credit_transactions (
    id                        bigint GENERATED ALWAYS AS IDENTITY,
    organization_id           uuid NOT NULL REFERENCES organizations (id),
    transaction_type          text NOT NULL CHECK (transaction_type IN (
        'plan_allocation', 'monthly_expiry', 'promo_bonus', 'topup_purchase', 'consumption',
        'plan_change_adjustment', 'admin_adjustment', 'refund')),
    credits_amount_micro      bigint NOT NULL,
    monthly_micro             bigint NOT NULL DEFAULT 0,
    bonus_micro               bigint NOT NULL DEFAULT 0,
    overdraft_micro           bigint NOT NULL DEFAULT 0,
    idempotency_key           text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    reservation_id            uuid,
    ai_capability_id          integer REFERENCES ai_capabilities (id),
    quality_level_id          integer REFERENCES quality_levels (id),
    -- price snapshot of a consumption: what the charge was computed from
    model                     text,
    provider                  text,
    input_usd_per_mtok        numeric(14, 6),
    output_usd_per_mtok       numeric(14, 6),
    credit_multiplier         numeric(8, 4),
    credits_per_usd           numeric(12, 4),
    prompt_tokens             integer CHECK (prompt_tokens >= 0),
    completion_tokens         integer CHECK (completion_tokens >= 0),
    reserved_micro            bigint CHECK (reserved_micro >= 0),
    estimated_credits_micro   bigint CHECK (estimated_credits_micro >= 0),
    estimation_variance_micro bigint GENERATED ALWAYS AS
        (-credits_amount_micro - estimated_credits_micro) STORED,  -- actual - estimate
    overage_micro             bigint GENERATED ALWAYS AS
        (greatest(-credits_amount_micro - reserved_micro, 0)) STORED,  -- charged beyond the hold
    description               text,
    provider_metadata         jsonb,
    created_at                timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, id),
    UNIQUE (organization_id, idempotency_key),
    FOREIGN KEY (organization_id, reservation_id)
        REFERENCES credit_reservations (organization_id, id),
    CHECK (credits_amount_micro = monthly_micro + bonus_micro + overdraft_micro),
    CHECK ((transaction_type = 'consumption') = (reservation_id IS NOT NULL)),
    CHECK (CASE transaction_type
        WHEN 'consumption' THEN credits_amount_micro <= 0
        WHEN 'monthly_expiry' THEN credits_amount_micro < 0 AND bonus_micro = 0 AND overdraft_micro = 0
        WHEN 'refund' THEN credits_amount_micro < 0
        WHEN 'plan_allocation' THEN credits_amount_micro > 0
        WHEN 'promo_bonus' THEN credits_amount_micro > 0
        WHEN 'topup_purchase' THEN credits_amount_micro > 0
        ELSE credits_amount_micro <> 0
    END),
    -- a debit never adds to a bucket, a credit never takes from one
    CHECK (credits_amount_micro > 0 OR (monthly_micro <= 0 AND bonus_micro <= 0 AND overdraft_micro <= 0)),
    CHECK (credits_amount_micro < 0 OR (monthly_micro >= 0 AND bonus_micro >= 0 AND overdraft_micro >= 0))
);
-- No reservation is ever charged twice.
CREATE UNIQUE INDEX credit_transactions_reservation_idx
    ON credit_transactions (organization_id, reservation_id) WHERE reservation_id IS NOT NULL;
CREATE INDEX credit_transactions_org_time_idx ON credit_transactions (organization_id, created_at);
CREATE INDEX credit_transactions_org_type_idx
    ON credit_transactions (organization_id, transaction_type, id);
CREATE INDEX credit_transactions_capability_idx ON credit_transactions (ai_capability_id);
-- Covers the used-this-period sum.
CREATE INDEX credit_transactions_consumption_idx
    ON credit_transactions (organization_id, created_at) INCLUDE (credits_amount_micro)
    WHERE transaction_type = 'consumption';

CREATE FUNCTION credit_transactions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_transactions is append-only' USING ERRCODE = 'GL008';
END $$;
CREATE TRIGGER credit_transactions_append_only BEFORE UPDATE OR DELETE ON credit_transactions
    FOR EACH ROW EXECUTE FUNCTION credit_transactions_append_only();
CREATE TRIGGER credit_transactions_no_truncate BEFORE TRUNCATE ON credit_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION credit_transactions_append_only();

-- Low-balance notifications: at most one per threshold per organization per day.
CREATE TABLE credit_notifications (
    organization_id uuid NOT NULL REFERENCES organizations (id),
    threshold       text NOT NULL CHECK (threshold IN ('low_balance', 'depleted')),
    notified_on     date NOT NULL,
    payload         jsonb NOT NULL,
    attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, threshold, notified_on)
);

CREATE TRIGGER organization_credit_balances_updated_at BEFORE UPDATE ON organization_credit_balances
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- The seed's functions (T2.6): amounts in credits, 0 for an unknown organization.
CREATE FUNCTION get_used_this_period(p_org uuid) RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce(-sum(t.credits_amount_micro), 0)::numeric / 1000000
      FROM organization_credit_balances b
      JOIN credit_transactions t ON t.organization_id = b.organization_id
     WHERE b.organization_id = p_org AND t.transaction_type = 'consumption'
       AND t.created_at >= b.period_start AND t.created_at < b.period_end
$$;

CREATE FUNCTION get_available_credits(p_org uuid) RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT (monthly_remaining_micro + bonus_credits_micro - overdraft_used_micro)::numeric
                       FROM organization_credit_balances WHERE organization_id = p_org), 0) / 1000000
$$;

CREATE FUNCTION get_spendable_credits(p_org uuid) RETURNS numeric LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT (monthly_remaining_micro + bonus_credits_micro - overdraft_used_micro
                             - reserved_credits_micro + overdraft_limit_micro)::numeric
                       FROM organization_credit_balances WHERE organization_id = p_org), 0) / 1000000
$$;
