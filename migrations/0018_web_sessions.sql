-- Sessions of tally's web pages: the customer portal (one customer each, opened through a
-- single-use link an admin asked for) and the operator console (an admin token exchanged at
-- the login page). Secrets are kept as SHA-256 digests only: a row read from a backup opens
-- nothing.
CREATE TABLE web_sessions (
    id uuid PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('portal', 'console')),
    -- portal: the one customer the session reads.
    customer_id text,
    -- console: the admin token that logged in (its name, for people, and the SHA-256 of the
    -- token, which is what the session stands for: a token removed or replaced, even under
    -- the same name, ends its sessions).
    token_name text,
    token_sha256 bytea,
    -- portal: the link's secret, usable once (then NULL in effect: exchanged_at is set).
    link_sha256 bytea UNIQUE,
    -- The cookie's secret, set when the link is exchanged (portal) or at login (console).
    cookie_sha256 bytea UNIQUE,
    -- Sent with every form; a change without it is refused.
    csrf_token text NOT NULL,
    -- portal: where its "back" link leads (checked against serve.checkout_return_origins).
    return_url text,
    created_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    exchanged_at timestamptz,
    revoked_at timestamptz,
    CHECK ((kind = 'portal') = (customer_id IS NOT NULL)),
    CHECK ((kind = 'console') = (token_name IS NOT NULL AND token_sha256 IS NOT NULL)),
    CHECK (expires_at > created_at)
);

CREATE INDEX web_sessions_customer ON web_sessions (customer_id) WHERE customer_id IS NOT NULL;
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);

-- Alert rules a customer made itself (portal, or its own token, on a self-serve plan), for the
-- bound of 20 a day: a rule may fire at once, to every endpoint, and making and deleting rules
-- in a loop must not become a flood. Rows older than a day are deleted as new ones come.
CREATE TABLE customer_alert_rule_creations (
    customer_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX customer_alert_rule_creations_customer ON customer_alert_rule_creations (customer_id, created_at);
