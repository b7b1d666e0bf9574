-- credit_store_balance as PL/pgSQL: a LANGUAGE sql function called from PL/pgSQL is parsed
-- and planned again on every call (PostgreSQL caches no plan for it across calls); a
-- PL/pgSQL one keeps its plan for the session. Same statement, same effect.
CREATE OR REPLACE FUNCTION credit_store_balance(b organization_credit_balances) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE organization_credit_balances
       SET reserved_credits_micro = b.reserved_credits_micro,
           monthly_remaining_micro = b.monthly_remaining_micro,
           bonus_credits_micro = b.bonus_credits_micro,
           overdraft_used_micro = b.overdraft_used_micro
     WHERE organization_id = b.organization_id;
END $$;
