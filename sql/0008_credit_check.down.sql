DROP FUNCTION credit_check(uuid);
