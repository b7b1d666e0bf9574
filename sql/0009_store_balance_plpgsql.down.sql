CREATE OR REPLACE FUNCTION credit_store_balance(b organization_credit_balances) RETURNS void
LANGUAGE sql AS $$
    UPDATE organization_credit_balances
       SET reserved_credits_micro = b.reserved_credits_micro,
           monthly_remaining_micro = b.monthly_remaining_micro,
           bonus_credits_micro = b.bonus_credits_micro,
           overdraft_used_micro = b.overdraft_used_micro
     WHERE organization_id = b.organization_id
$$;
