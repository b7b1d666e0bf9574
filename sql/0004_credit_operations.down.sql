DROP FUNCTION credit_change_plan(uuid, text, text, timestamptz);
DROP FUNCTION credit_reset_period(uuid, timestamptz);
DROP FUNCTION credit_create_organization(uuid, text, text, timestamptz);
DROP FUNCTION credit_release(uuid, uuid, text, boolean, timestamptz);
DROP FUNCTION credit_settle(uuid, uuid, bigint, text, text, numeric, numeric, numeric, numeric,
                            integer, integer, bigint, jsonb);
DROP FUNCTION credit_reserve(uuid, text, bigint, bigint, integer, text, text, text, text);
DROP FUNCTION credit_post(uuid, text, bigint, text, text, jsonb);
DROP FUNCTION credit_check_key(text);
DROP FUNCTION credit_book(organization_credit_balances, text, bigint, text, text, jsonb, bigint);
DROP FUNCTION credit_split(organization_credit_balances, text, bigint);
DROP FUNCTION credit_utc(timestamptz);
DROP FUNCTION credit_spendable(organization_credit_balances);
DROP FUNCTION credit_available(organization_credit_balances);
DROP FUNCTION credit_lock_balance(uuid);
