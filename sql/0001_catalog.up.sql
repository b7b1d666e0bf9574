-- The catalog (ADR-023 Phase 1, T2.1, T2.8): synced from config.yaml by `llm-gateway seed`
-- and at start-up. Past one PostgreSQL primary these become Citus reference tables.

CREATE FUNCTION set_updated_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TABLE llm_providers (
    id          integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    unique_name text NOT NULL UNIQUE,
    kind        text NOT NULL CHECK (kind IN ('openai', 'anthropic', 'gemini')),
    api_base    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE quality_levels (
    id                integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    unique_name       text NOT NULL UNIQUE,
    name              text NOT NULL,
    description       text,
    display_order     integer NOT NULL,
    credit_multiplier numeric(8, 4) NOT NULL CHECK (credit_multiplier > 0),
    is_active         boolean NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ai_capabilities (
    id                         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    unique_name                text NOT NULL UNIQUE,
    name                       text NOT NULL,
    description                text,
    category                   text,
    icon                       text,
    -- typical cost shown by access-check, in credits (the seed's three levels)
    estimated_credits_fast     numeric(18, 6) CHECK (estimated_credits_fast >= 0),
    estimated_credits_enhanced numeric(18, 6) CHECK (estimated_credits_enhanced >= 0),
    estimated_credits_premium  numeric(18, 6) CHECK (estimated_credits_premium >= 0),
    max_output_tokens          integer CHECK (max_output_tokens > 0),
    is_active                  boolean NOT NULL DEFAULT true,
    created_at                 timestamptz NOT NULL DEFAULT now(),
    updated_at                 timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plans (
    id                       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    unique_name              text NOT NULL UNIQUE,
    name                     text NOT NULL,
    display_order            integer NOT NULL,  -- tier: a higher order is an upgrade
    monthly_ai_credits_micro bigint NOT NULL DEFAULT 0 CHECK (monthly_ai_credits_micro >= 0),
    welcome_bonus_micro      bigint NOT NULL DEFAULT 0 CHECK (welcome_bonus_micro >= 0),
    overdraft_limit_micro    bigint NOT NULL DEFAULT 0 CHECK (overdraft_limit_micro >= 0),
    is_active                boolean NOT NULL DEFAULT true,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE plan_ai_capabilities (
    id                integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_id           integer NOT NULL REFERENCES plans (id) ON DELETE CASCADE,
    ai_capability_id  integer NOT NULL REFERENCES ai_capabilities (id) ON DELETE CASCADE,
    is_enabled        boolean NOT NULL DEFAULT true,
    rate_limit_rpm    integer CHECK (rate_limit_rpm > 0),  -- NULL: unlimited
    rate_limit_rpd    integer CHECK (rate_limit_rpd > 0),  -- NULL: unlimited
    max_output_tokens integer CHECK (max_output_tokens > 0),
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (plan_id, ai_capability_id)
);
CREATE INDEX plan_ai_capabilities_capability_idx ON plan_ai_capabilities (ai_capability_id);

CREATE TABLE plan_ai_capability_quality_levels (
    id                     integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_ai_capability_id  integer NOT NULL REFERENCES plan_ai_capabilities (id) ON DELETE CASCADE,
    quality_level_id       integer NOT NULL REFERENCES quality_levels (id) ON DELETE CASCADE,
    created_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (plan_ai_capability_id, quality_level_id)
);
CREATE INDEX plan_ai_capability_quality_levels_quality_idx
    ON plan_ai_capability_quality_levels (quality_level_id);

CREATE TABLE llm_models (
    id                       integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    unique_name              text NOT NULL UNIQUE,
    provider                 text NOT NULL REFERENCES llm_providers (unique_name) ON UPDATE CASCADE,
    model_id                 text NOT NULL,  -- the name the upstream knows it by
    mode                     text NOT NULL DEFAULT 'chat' CHECK (mode IN ('chat', 'embedding')),
    display_name             text NOT NULL,
    quality_tier             text CHECK (quality_tier IN ('fast', 'balanced', 'powerful')),
    input_cost_per_million   numeric(14, 6) NOT NULL CHECK (input_cost_per_million >= 0),
    output_cost_per_million  numeric(14, 6) NOT NULL CHECK (output_cost_per_million >= 0),
    context_window           integer NOT NULL CHECK (context_window > 0),
    max_output_tokens        integer CHECK (max_output_tokens > 0),
    is_active                boolean NOT NULL DEFAULT true,
    deprecated_at            timestamptz,
    replacement_model_id     integer REFERENCES llm_models (id) ON DELETE SET NULL,
    display_order            integer NOT NULL DEFAULT 0,
    created_at               timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    CHECK (replacement_model_id IS DISTINCT FROM id)
);
CREATE INDEX llm_models_provider_tier_idx ON llm_models (provider, quality_tier);
CREATE INDEX llm_models_active_idx ON llm_models (is_active);

CREATE TABLE plan_quality_level_models (
    id                                  integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_ai_capability_quality_level_id integer NOT NULL
        REFERENCES plan_ai_capability_quality_levels (id) ON DELETE CASCADE,
    llm_model_id                        integer NOT NULL REFERENCES llm_models (id) ON DELETE CASCADE,
    is_default                          boolean NOT NULL DEFAULT false,
    priority                            integer NOT NULL CHECK (priority >= 0),  -- 0 tried first
    created_at                          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (plan_ai_capability_quality_level_id, llm_model_id),
    UNIQUE (plan_ai_capability_quality_level_id, priority),
    CHECK (is_default = (priority = 0))
);
CREATE INDEX plan_quality_level_models_model_idx ON plan_quality_level_models (llm_model_id);

CREATE TABLE credit_topup_packages (
    id               integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    unique_name      text NOT NULL UNIQUE,
    name             text NOT NULL,
    description      text,
    credits_micro    bigint NOT NULL CHECK (credits_micro > 0),
    price_usd_cents  integer NOT NULL CHECK (price_usd_cents > 0),
    price_per_credit numeric GENERATED ALWAYS AS
        (round(price_usd_cents::numeric * 10000 / credits_micro, 6)) STORED,  -- USD
    is_popular       boolean NOT NULL DEFAULT false,
    is_active        boolean NOT NULL DEFAULT true,
    display_order    integer NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER llm_providers_updated_at BEFORE UPDATE ON llm_providers
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER quality_levels_updated_at BEFORE UPDATE ON quality_levels
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER ai_capabilities_updated_at BEFORE UPDATE ON ai_capabilities
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER plans_updated_at BEFORE UPDATE ON plans
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER plan_ai_capabilities_updated_at BEFORE UPDATE ON plan_ai_capabilities
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER llm_models_updated_at BEFORE UPDATE ON llm_models
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE TRIGGER credit_topup_packages_updated_at BEFORE UPDATE ON credit_topup_packages
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
