-- Fewer statements per hold and per settlement: the same operations, the same outcomes.
--
-- Inside a PL/pgSQL function every SQL statement (a SELECT INTO, an UPDATE, a RETURN QUERY,
-- a PERFORM) starts and ends an executor of its own; on a hot ledger that fixed cost, not the
-- rows, is most of the server's CPU per call. These versions:
--
-- * return their rows with RETURN NEXT (the output columns are variables) instead of a
--   RETURN QUERY SELECT per row;
-- * check the idempotency key with an expression (credit_check_key was a PERFORM);
-- * in a batch of holds, look the capability and quality level up once per name, not per
--   item (a batch's items nearly always share them), and the holds that already exist with
--   the batch's keys in one query after the locks, instead of one per item.
--
-- The locking order, the validation and its messages, the rows written and the results are
-- those of 0004 (single operations) and 0007 (batches); tests/ledger hold both to them.

CREATE OR REPLACE FUNCTION credit_reserve(p_org uuid, p_key text, p_minimum bigint,
                                          p_requested bigint, p_ttl_s integer,
                                          p_capability text DEFAULT NULL,
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
    IF p_key IS NULL OR length(p_key) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'an idempotency key of 1 to 255 characters is required'
            USING ERRCODE = 'GL001';
    END IF;
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
        reservation_id := r.id; status := r.status; amount_micro := r.amount_micro;
        spendable_micro := v_spendable; expires_at := r.expires_at; replayed := true;
        RETURN NEXT;
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
    reservation_id := r.id; status := r.status; amount_micro := r.amount_micro;
    spendable_micro := v_spendable - v_hold; expires_at := r.expires_at; replayed := false;
    RETURN NEXT;
END $$;

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
        status := r.status; applied := false; transaction_id := v_txn;
        charged_micro := r.charged_micro; available_micro := credit_available(b);
        spendable_micro := credit_spendable(b); monthly_credits_micro := b.monthly_credits_micro;
        RETURN NEXT;
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
    status := 'settled'; applied := true; transaction_id := v_txn; charged_micro := p_charge;
    available_micro := credit_available(b); spendable_micro := credit_spendable(b);
    monthly_credits_micro := b.monthly_credits_micro;
    RETURN NEXT;
END $$;

CREATE OR REPLACE FUNCTION credit_reserve_batch(p_org uuid[], p_key text[], p_minimum bigint[],
                                                p_requested bigint[], p_ttl_s integer[],
                                                p_capability text[], p_quality text[],
                                                p_model text[], p_request_id text[])
RETURNS TABLE (ord integer, reservation_id uuid, status text, amount_micro bigint,
               spendable_micro bigint, expires_at timestamptz, replayed boolean,
               error_code text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    i integer;
    b organization_credit_balances;
    v_org uuid;  -- whose balance b holds
    v_found boolean := false;  -- b holds a balance
    v_dirty boolean := false;  -- b has moved since it was read
    v_capability integer;
    v_capability_name text;  -- the name v_capability is the id of
    v_quality integer;
    v_quality_name text;
    v_spendable bigint;
    v_hold bigint;
    v_status text;
    v_id uuid;
    v_expires timestamptz;
    v_seen text;
    k integer;
    -- the holds that existed before the batch with one of its keys
    x_seen text[];
    x_id uuid[];
    x_status text[];
    x_minimum bigint[];
    x_requested bigint[];
    x_amount bigint[];
    x_expires timestamptz[];
    -- the batch's new holds, written together after the loop
    h_id uuid[] := '{}';
    h_org uuid[] := '{}';
    h_key text[] := '{}';
    h_seen text[] := '{}';  -- organization/key, to find a key reused within the batch
    h_status text[] := '{}';
    h_minimum bigint[] := '{}';
    h_requested bigint[] := '{}';
    h_amount bigint[] := '{}';
    h_capability integer[] := '{}';
    h_quality integer[] := '{}';
    h_model text[] := '{}';
    h_request_id text[] := '{}';
    h_expires timestamptz[] := '{}';
BEGIN
    n := credit_check_batch(cardinality(p_org), cardinality(p_key), cardinality(p_minimum),
                            cardinality(p_requested), cardinality(p_ttl_s),
                            cardinality(p_capability), cardinality(p_quality),
                            cardinality(p_model), cardinality(p_request_id));
    PERFORM credit_lock_balances(p_org);
    -- after the locks: no hold of these organizations can appear until this commits. (One
    -- index probe per key, whatever the table's size when the plan was cached: a plain join
    -- is planned as a hash join over a scan of the whole table while it is small.)
    SELECT array_agg(cr.organization_id::text || '/' || cr.idempotency_key), array_agg(cr.id),
           array_agg(cr.status), array_agg(cr.minimum_micro), array_agg(cr.requested_micro),
           array_agg(cr.amount_micro), array_agg(cr.expires_at)
      INTO x_seen, x_id, x_status, x_minimum, x_requested, x_amount, x_expires
      FROM unnest(p_org, p_key) AS q(org, key)
      CROSS JOIN LATERAL (SELECT * FROM credit_reservations c
                           WHERE c.organization_id = q.org AND c.idempotency_key = q.key
                           LIMIT 1) cr;
    -- an organization's items together (in their order): its balance is read and written once
    FOR i IN SELECT g.i FROM generate_subscripts(p_org, 1) AS g(i) ORDER BY p_org[g.i], g.i LOOP
        ord := i; reservation_id := NULL; status := NULL; amount_micro := NULL;
        spendable_micro := NULL; expires_at := NULL; replayed := NULL; error_code := NULL;
        error_message := NULL;
        IF v_org IS DISTINCT FROM p_org[i] THEN
            IF v_dirty THEN
                PERFORM credit_store_balance(b);
                v_dirty := false;
            END IF;
            v_org := p_org[i];
            SELECT * INTO b FROM organization_credit_balances ob WHERE ob.organization_id = v_org;
            v_found := FOUND;
        END IF;
        IF p_minimum[i] IS NULL OR p_requested[i] IS NULL OR p_minimum[i] < 0
           OR p_requested[i] <= 0 OR p_minimum[i] > p_requested[i] THEN
            error_code := 'GL001';
            error_message := format('invalid reservation amounts: minimum %s, requested %s',
                                    coalesce(p_minimum[i]::text, '<NULL>'),
                                    coalesce(p_requested[i]::text, '<NULL>'));
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_ttl_s[i] IS NULL OR p_ttl_s[i] <= 0 THEN
            error_code := 'GL001';
            error_message := format('invalid reservation ttl %s',
                                    coalesce(p_ttl_s[i]::text, '<NULL>'));
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_key[i] IS NULL OR length(p_key[i]) NOT BETWEEN 1 AND 255 THEN
            error_code := 'GL001';
            error_message := 'an idempotency key of 1 to 255 characters is required';
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_capability[i] IS NULL THEN
            v_capability := NULL;
            v_capability_name := NULL;
        ELSIF p_capability[i] IS DISTINCT FROM v_capability_name THEN
            v_capability_name := NULL;
            SELECT c.id INTO v_capability FROM ai_capabilities c
             WHERE c.unique_name = p_capability[i];
            IF NOT FOUND THEN
                error_code := 'GL009';
                error_message := format('unknown capability %s', p_capability[i]);
                RETURN NEXT;
                CONTINUE;
            END IF;
            v_capability_name := p_capability[i];
        END IF;
        IF p_quality[i] IS NULL THEN
            v_quality := NULL;
            v_quality_name := NULL;
        ELSIF p_quality[i] IS DISTINCT FROM v_quality_name THEN
            v_quality_name := NULL;
            SELECT q.id INTO v_quality FROM quality_levels q WHERE q.unique_name = p_quality[i];
            IF NOT FOUND THEN
                error_code := 'GL009';
                error_message := format('unknown quality level %s', p_quality[i]);
                RETURN NEXT;
                CONTINUE;
            END IF;
            v_quality_name := p_quality[i];
        END IF;
        IF NOT v_found THEN
            error_code := 'GL002';
            error_message := format('unknown organization %s', coalesce(p_org[i]::text, '<NULL>'));
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_spendable := credit_spendable(b);
        v_seen := p_org[i]::text || '/' || p_key[i];
        k := array_position(h_seen, v_seen);
        IF k IS NOT NULL THEN  -- the key of an earlier item of this batch
            IF h_minimum[k] <> p_minimum[i] OR h_requested[k] <> p_requested[i] THEN
                error_code := 'GL004';
                error_message := format('idempotency key %s was used for a different reservation',
                                        p_key[i]);
                RETURN NEXT;
                CONTINUE;
            END IF;
            reservation_id := h_id[k]; status := h_status[k]; amount_micro := h_amount[k];
            spendable_micro := v_spendable; expires_at := h_expires[k]; replayed := true;
            RETURN NEXT;
            CONTINUE;
        END IF;
        k := array_position(x_seen, v_seen);
        IF k IS NOT NULL THEN  -- the key of a hold taken before this batch
            IF x_minimum[k] <> p_minimum[i] OR x_requested[k] <> p_requested[i] THEN
                error_code := 'GL004';
                error_message := format('idempotency key %s was used for a different reservation',
                                        p_key[i]);
                RETURN NEXT;
                CONTINUE;
            END IF;
            reservation_id := x_id[k]; status := x_status[k]; amount_micro := x_amount[k];
            spendable_micro := v_spendable; expires_at := x_expires[k]; replayed := true;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_hold := 0;
        v_status := 'rejected';
        IF v_spendable >= p_minimum[i] THEN
            v_hold := least(p_requested[i], v_spendable);
            v_status := 'pending';
            b.reserved_credits_micro := b.reserved_credits_micro + v_hold;
            v_dirty := true;
        END IF;
        v_id := gen_random_uuid();
        v_expires := now() + make_interval(secs => p_ttl_s[i]);
        h_id := h_id || v_id;
        h_org := h_org || p_org[i];
        h_key := h_key || p_key[i];
        h_seen := h_seen || v_seen;
        h_status := h_status || v_status;
        h_minimum := h_minimum || p_minimum[i];
        h_requested := h_requested || p_requested[i];
        h_amount := h_amount || v_hold;
        h_capability := h_capability || v_capability;
        h_quality := h_quality || v_quality;
        h_model := h_model || p_model[i];
        h_request_id := h_request_id || p_request_id[i];
        h_expires := h_expires || v_expires;
        reservation_id := v_id; status := v_status; amount_micro := v_hold;
        spendable_micro := v_spendable - v_hold; expires_at := v_expires; replayed := false;
        RETURN NEXT;
    END LOOP;
    IF v_dirty THEN
        PERFORM credit_store_balance(b);
    END IF;
    -- one statement for every new hold (refused ones are remembered as 'rejected')
    INSERT INTO credit_reservations (id, organization_id, idempotency_key, status, minimum_micro,
                                     requested_micro, amount_micro, ai_capability_id,
                                     quality_level_id, model, request_id, expires_at,
                                     resolved_at)
    SELECT h.id, h.org, h.key, h.status, h.minimum, h.requested, h.amount, h.capability,
           h.quality, h.model, h.request_id, h.expires,
           CASE WHEN h.status = 'rejected' THEN now() END
      FROM unnest(h_id, h_org, h_key, h_status, h_minimum, h_requested, h_amount, h_capability,
                  h_quality, h_model, h_request_id, h_expires)
           AS h(id, org, key, status, minimum, requested, amount, capability, quality, model,
                request_id, expires);
END $$;

CREATE OR REPLACE FUNCTION credit_settle_batch(p_org uuid[], p_reservation uuid[],
                                               p_charge bigint[], p_model text[],
                                               p_provider text[],
                                               p_input_usd_per_mtok numeric[],
                                               p_output_usd_per_mtok numeric[],
                                               p_credit_multiplier numeric[],
                                               p_credits_per_usd numeric[],
                                               p_prompt_tokens integer[],
                                               p_completion_tokens integer[],
                                               p_estimated_micro bigint[], p_metadata jsonb[])
RETURNS TABLE (ord integer, status text, applied boolean, transaction_id bigint,
               charged_micro bigint, available_micro bigint, spendable_micro bigint,
               monthly_credits_micro bigint, error_code text, error_message text)
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    i integer;
    b organization_credit_balances;
    v_org uuid;  -- whose balance b holds
    v_found boolean := false;  -- b holds a balance
    v_dirty boolean := false;  -- b has moved since it was read
    r credit_reservations;
    s record;
    v_txn bigint;
    v_entries regclass := pg_get_serial_sequence('credit_transactions', 'id')::regclass;
    k integer;
    -- the batch's consumption entries, written together after the loop
    e_id bigint[] := '{}';
    e_org uuid[] := '{}';
    e_amount bigint[] := '{}';
    e_monthly bigint[] := '{}';
    e_bonus bigint[] := '{}';
    e_overdraft bigint[] := '{}';
    e_reservation uuid[] := '{}';
    e_capability integer[] := '{}';
    e_quality integer[] := '{}';
    e_model text[] := '{}';
    e_provider text[] := '{}';
    e_input numeric[] := '{}';
    e_output numeric[] := '{}';
    e_multiplier numeric[] := '{}';
    e_per_usd numeric[] := '{}';
    e_prompt integer[] := '{}';
    e_completion integer[] := '{}';
    e_reserved bigint[] := '{}';
    e_estimated bigint[] := '{}';
    e_metadata jsonb[] := '{}';
BEGIN
    n := credit_check_batch(cardinality(p_org), cardinality(p_reservation),
                            cardinality(p_charge), cardinality(p_model),
                            cardinality(p_provider), cardinality(p_input_usd_per_mtok),
                            cardinality(p_output_usd_per_mtok), cardinality(p_credit_multiplier),
                            cardinality(p_credits_per_usd), cardinality(p_prompt_tokens),
                            cardinality(p_completion_tokens), cardinality(p_estimated_micro),
                            cardinality(p_metadata));
    PERFORM credit_lock_balances(p_org);
    -- an organization's items together (in their order): its balance is read and written once
    FOR i IN SELECT g.i FROM generate_subscripts(p_org, 1) AS g(i) ORDER BY p_org[g.i], g.i LOOP
        ord := i; status := NULL; applied := NULL; transaction_id := NULL; charged_micro := NULL;
        available_micro := NULL; spendable_micro := NULL; monthly_credits_micro := NULL;
        error_code := NULL; error_message := NULL;
        IF v_org IS DISTINCT FROM p_org[i] THEN
            IF v_dirty THEN
                PERFORM credit_store_balance(b);
                v_dirty := false;
            END IF;
            v_org := p_org[i];
            SELECT * INTO b FROM organization_credit_balances ob WHERE ob.organization_id = v_org;
            v_found := FOUND;
        END IF;
        IF p_charge[i] IS NULL OR p_charge[i] < 0 THEN
            error_code := 'GL001';
            error_message := format('invalid charge %s', coalesce(p_charge[i]::text, '<NULL>'));
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF NOT v_found THEN
            error_code := 'GL002';
            error_message := format('unknown organization %s', coalesce(p_org[i]::text, '<NULL>'));
            RETURN NEXT;
            CONTINUE;
        END IF;
        UPDATE credit_reservations cr
           SET status = 'settled', charged_micro = p_charge[i], resolved_at = now()
         WHERE cr.organization_id = p_org[i] AND cr.id = p_reservation[i]
           AND cr.status = 'pending'
        RETURNING * INTO r;
        IF NOT FOUND THEN
            SELECT * INTO r FROM credit_reservations cr
             WHERE cr.organization_id = p_org[i] AND cr.id = p_reservation[i];
            IF NOT FOUND THEN
                error_code := 'GL005';
                error_message := format('unknown reservation %s',
                                        coalesce(p_reservation[i]::text, '<NULL>'));
                RETURN NEXT;
                CONTINUE;
            END IF;
            IF r.status = 'settled' AND r.charged_micro <> p_charge[i] THEN
                error_code := 'GL004';
                error_message := format('reservation %s was settled for a different amount',
                                        r.id);
                RETURN NEXT;
                CONTINUE;
            END IF;
            k := array_position(e_reservation, r.id);  -- settled earlier in this batch
            IF k IS NOT NULL THEN
                v_txn := e_id[k];
            ELSE
                SELECT t.id INTO v_txn FROM credit_transactions t
                 WHERE t.organization_id = p_org[i] AND t.reservation_id = p_reservation[i];
            END IF;
            status := r.status; applied := false; transaction_id := v_txn;
            charged_micro := r.charged_micro; available_micro := credit_available(b);
            spendable_micro := credit_spendable(b);
            monthly_credits_micro := b.monthly_credits_micro;
            RETURN NEXT;
            CONTINUE;
        END IF;
        s := credit_split(b, 'consumption', -p_charge[i]);
        b.reserved_credits_micro := b.reserved_credits_micro - r.amount_micro;
        b.monthly_remaining_micro := b.monthly_remaining_micro + s.monthly;
        b.bonus_credits_micro := b.bonus_credits_micro + s.bonus;
        b.overdraft_used_micro := b.overdraft_used_micro - s.overdraft;
        v_dirty := true;
        v_txn := nextval(v_entries);
        e_id := e_id || v_txn;
        e_org := e_org || p_org[i];
        e_amount := e_amount || -p_charge[i];
        e_monthly := e_monthly || s.monthly;
        e_bonus := e_bonus || s.bonus;
        e_overdraft := e_overdraft || s.overdraft;
        e_reservation := e_reservation || r.id;
        e_capability := e_capability || r.ai_capability_id;
        e_quality := e_quality || r.quality_level_id;
        e_model := e_model || coalesce(p_model[i], r.model);
        e_provider := e_provider || p_provider[i];
        e_input := e_input || p_input_usd_per_mtok[i];
        e_output := e_output || p_output_usd_per_mtok[i];
        e_multiplier := e_multiplier || p_credit_multiplier[i];
        e_per_usd := e_per_usd || p_credits_per_usd[i];
        e_prompt := e_prompt || p_prompt_tokens[i];
        e_completion := e_completion || p_completion_tokens[i];
        e_reserved := e_reserved || r.amount_micro;
        e_estimated := e_estimated || p_estimated_micro[i];
        e_metadata := e_metadata || p_metadata[i];
        status := 'settled'; applied := true; transaction_id := v_txn;
        charged_micro := p_charge[i]; available_micro := credit_available(b);
        spendable_micro := credit_spendable(b); monthly_credits_micro := b.monthly_credits_micro;
        RETURN NEXT;
    END LOOP;
    IF v_dirty THEN
        PERFORM credit_store_balance(b);
    END IF;
    -- one statement for every new entry
    INSERT INTO credit_transactions (id, organization_id, transaction_type, credits_amount_micro,
        monthly_micro, bonus_micro, overdraft_micro, idempotency_key, reservation_id,
        ai_capability_id, quality_level_id, model, provider, input_usd_per_mtok,
        output_usd_per_mtok, credit_multiplier, credits_per_usd, prompt_tokens,
        completion_tokens, reserved_micro, estimated_credits_micro, provider_metadata)
    OVERRIDING SYSTEM VALUE
    SELECT e.id, e.org, 'consumption', e.amount, e.monthly, e.bonus, e.overdraft,
           'consumption:' || e.reservation::text, e.reservation, e.capability, e.quality,
           e.model, e.provider, e.input, e.output, e.multiplier, e.per_usd, e.prompt,
           e.completion, e.reserved, e.estimated, e.metadata
      FROM unnest(e_id, e_org, e_amount, e_monthly, e_bonus, e_overdraft, e_reservation,
                  e_capability, e_quality, e_model, e_provider, e_input, e_output, e_multiplier,
                  e_per_usd, e_prompt, e_completion, e_reserved, e_estimated, e_metadata)
           AS e(id, org, amount, monthly, bonus, overdraft, reservation, capability, quality,
                model, provider, input, output, multiplier, per_usd, prompt, completion,
                reserved, estimated, metadata);
END $$;
