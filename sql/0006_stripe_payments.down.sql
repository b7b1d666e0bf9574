DROP TABLE stripe_payments;
