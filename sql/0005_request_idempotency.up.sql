-- Idempotency-Key records of proxied requests (SPEC §5): a retry with the same key and body
-- gets the original response; the same key in flight gets 409, with another body 422.
CREATE TABLE request_idempotency (
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    idempotency_key  text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    request_hash     bytea NOT NULL CHECK (length(request_hash) = 32),
    state            text NOT NULL CHECK (state IN ('in_flight', 'done')),
    response_status  integer CHECK (response_status BETWEEN 100 AND 599),
    response_headers jsonb,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz NOT NULL,  -- an in-flight record past this was abandoned
    expires_at       timestamptz NOT NULL,  -- the record is forgotten after this
    PRIMARY KEY (organization_id, idempotency_key),
    CHECK ((state = 'done') = (response_status IS NOT NULL))
);
CREATE INDEX request_idempotency_expires_idx ON request_idempotency (expires_at);
