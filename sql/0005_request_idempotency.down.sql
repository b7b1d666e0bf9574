DROP TABLE request_idempotency;
