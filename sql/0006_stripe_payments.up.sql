-- Stripe top-ups as the webhook learns of them (SPEC §5, POST /webhooks/stripe). A paid
-- Checkout session and the refunds of its charge both name the PaymentIntent, so both kinds
-- of event upsert the same row, under its row lock: a refund that arrives before its payment
-- waits here and is reversed when the payment is credited, and the balance ends the same
-- whatever order Stripe delivers the events in. Credits still move only through credit_post
-- (topup_purchase, refund); this table records what was seen and how much was reversed.
--
-- Unlike the ledger's tables the key is not the organization: a refund names only the
-- PaymentIntent, and the organization is known once the session has been seen.
CREATE TABLE stripe_payments (
    -- the PaymentIntent id; the session id for a paid session without one
    payment_intent  text PRIMARY KEY CHECK (length(payment_intent) BETWEEN 1 AND 255),
    organization_id uuid REFERENCES organizations (id),  -- null until the session is seen
    session_id      text,  -- not UNIQUE: only the arbiter's conflicts are resolved by upsert
    package         text,
    credits_micro   bigint CHECK (credits_micro > 0),    -- credited for the payment
    charge_id       text,                                -- the charge refunds are reported on
    amount_cents    bigint CHECK (amount_cents > 0),     -- what that charge took
    refunded_cents  bigint NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),  -- most reported
    reversed_micro  bigint NOT NULL DEFAULT 0 CHECK (reversed_micro >= 0),  -- refunded so far
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK ((organization_id IS NULL) = (session_id IS NULL)),
    CHECK ((session_id IS NULL) = (credits_micro IS NULL)),
    CHECK (refunded_cents <= coalesce(amount_cents, 0)),
    CHECK (reversed_micro <= coalesce(credits_micro, 0))
);
CREATE INDEX stripe_payments_organization_idx ON stripe_payments (organization_id);

CREATE TRIGGER stripe_payments_updated_at BEFORE UPDATE ON stripe_payments
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
