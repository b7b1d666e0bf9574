-- Organizations, their plan (the seed's organization_plans, T2.2/T2.3) and API keys.

CREATE TABLE organizations (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name               text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    stripe_customer_id text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organization_plans (
    organization_id          uuid PRIMARY KEY REFERENCES organizations (id),
    plan_id                  integer NOT NULL REFERENCES plans (id),
    monthly_ai_credits_micro bigint NOT NULL CHECK (monthly_ai_credits_micro >= 0),
    pending_plan_id          integer REFERENCES plans (id),
    pending_change_at        timestamptz,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CHECK ((pending_plan_id IS NULL) = (pending_change_at IS NULL)),
    CHECK (pending_plan_id IS DISTINCT FROM plan_id)
);
CREATE INDEX organization_plans_pending_idx ON organization_plans (pending_change_at)
    WHERE pending_change_at IS NOT NULL;

-- Keys are 256-bit random secrets, so a plain SHA-256 is the right hash: nothing to brute-force.
CREATE TABLE api_keys (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid NOT NULL REFERENCES organizations (id),
    name            text,
    key_prefix      text NOT NULL,  -- the first characters, to recognise a key in lists
    key_hash        bytea NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_keys_organization_idx ON api_keys (organization_id);

CREATE TRIGGER organizations_updated_at BEFORE UPDATE ON organizations
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER organization_plans_updated_at BEFORE UPDATE ON organization_plans
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
