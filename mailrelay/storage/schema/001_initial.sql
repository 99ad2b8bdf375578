-- The whole product's data model.  Type tokens (@ID@, @BOOL@, ...) are filled
-- per engine by mailrelay.storage.engines; times are Unix seconds (@REAL@).

CREATE TABLE accounts (
    id @ID@,
    name TEXT NOT NULL,
    parent_id @BIGINT@ REFERENCES accounts (id),
    password_hash TEXT,
    approved @BOOL@ NOT NULL DEFAULT @TRUE@,
    suspended @BOOL@ NOT NULL DEFAULT @FALSE@,
    daily_quota INTEGER,
    rate_limit_per_minute INTEGER,
    notification_address TEXT,
    header_text TEXT,
    footer_text TEXT,
    header_html TEXT,
    footer_html TEXT,
    open_tracking @BOOL@ NOT NULL DEFAULT @FALSE@,
    click_tracking @BOOL@ NOT NULL DEFAULT @FALSE@,
    unsubscribe_link @BOOL@ NOT NULL DEFAULT @FALSE@,
    created_at @REAL@ NOT NULL
);
CREATE UNIQUE INDEX accounts_top_name ON accounts (name) WHERE parent_id IS NULL;
CREATE UNIQUE INDEX accounts_child_name ON accounts (parent_id, name) WHERE parent_id IS NOT NULL;

CREATE TABLE sending_domains (
    id @ID@,
    account_id @BIGINT@ NOT NULL REFERENCES accounts (id),
    domain TEXT NOT NULL UNIQUE,
    verified @BOOL@ NOT NULL DEFAULT @FALSE@,
    dkim_selector TEXT NOT NULL,
    dkim_private_key TEXT NOT NULL,
    dkim_ed25519_key TEXT,
    header_text TEXT,
    footer_text TEXT,
    header_html TEXT,
    footer_html TEXT,
    created_at @REAL@ NOT NULL,
    verified_at @REAL@
);
CREATE INDEX sending_domains_account ON sending_domains (account_id);

-- Generated secrets (SMTP users, API tokens, API keys) are stored as the
-- SHA-256 hex digest of a 256-bit random secret, shown once.
CREATE TABLE credentials (
    id @ID@,
    account_id @BIGINT@ NOT NULL REFERENCES accounts (id),
    kind TEXT NOT NULL,
    username TEXT,
    secret_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL DEFAULT '',
    domain_id @BIGINT@ REFERENCES sending_domains (id),
    label TEXT,
    created_at @REAL@ NOT NULL,
    revoked_at @REAL@,
    last_used_at @REAL@
);
CREATE UNIQUE INDEX credentials_username ON credentials (username) WHERE username IS NOT NULL;
CREATE INDEX credentials_account ON credentials (account_id);

CREATE TABLE lists (
    id @ID@,
    account_id @BIGINT@ NOT NULL REFERENCES accounts (id),
    guid TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    created_at @REAL@ NOT NULL
);
CREATE UNIQUE INDEX lists_account_name ON lists (account_id, name);

CREATE TABLE list_members (
    list_id @BIGINT@ NOT NULL REFERENCES lists (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    name TEXT,
    added_at @REAL@ NOT NULL,
    PRIMARY KEY (list_id, address)
);

CREATE TABLE campaigns (
    id @ID@,
    account_id @BIGINT@ NOT NULL REFERENCES accounts (id),
    guid TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    subject TEXT,
    list_id @BIGINT@ REFERENCES lists (id),
    created_at @REAL@ NOT NULL
);
CREATE INDEX campaigns_account_subject ON campaigns (account_id, subject);

-- scope is 'account' or 'list:<guid>'; reason hard_bounce | complaint | unsubscribe | manual.
CREATE TABLE suppressions (
    id @ID@,
    account_id @BIGINT@ NOT NULL REFERENCES accounts (id),
    address TEXT NOT NULL,
    scope TEXT NOT NULL DEFAULT 'account',
    reason TEXT NOT NULL,
    detail TEXT,
    created_at @REAL@ NOT NULL,
    expires_at @REAL@
);
CREATE UNIQUE INDEX suppressions_key ON suppressions (account_id, address, scope);

CREATE TABLE messages (
    id @ID@,
    queue_id TEXT NOT NULL UNIQUE,
    account_id @BIGINT@ NOT NULL REFERENCES accounts (id),
    credential_id @BIGINT@,
    transmission_id TEXT,
    message_id_header TEXT,
    mail_from TEXT NOT NULL,
    subject TEXT,
    campaign_id @BIGINT@,
    list_id @BIGINT@,
    tags TEXT NOT NULL DEFAULT '',
    size @BIGINT@ NOT NULL,
    recipients INTEGER NOT NULL,
    client_ip TEXT,
    node TEXT,
    created_at @REAL@ NOT NULL
);
CREATE INDEX messages_account_time ON messages (account_id, created_at);
CREATE INDEX messages_transmission ON messages (transmission_id);

CREATE TABLE recipients (
    queue_id TEXT NOT NULL,
    rcpt_index INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_reply TEXT,
    updated_at @REAL@ NOT NULL,
    PRIMARY KEY (queue_id, rcpt_index)
);

CREATE TABLE events (
    id @ID@,
    ts @REAL@ NOT NULL,
    account_id @BIGINT@ NOT NULL,
    type TEXT NOT NULL,
    queue_id TEXT,
    message_id TEXT,
    transmission_id TEXT,
    recipient TEXT,
    campaign_id @BIGINT@,
    tags TEXT NOT NULL DEFAULT '',
    detail TEXT
);
CREATE INDEX events_account_time ON events (account_id, ts);
CREATE INDEX events_queue ON events (queue_id);

-- Daily counters: the quota check and the statistics roll-ups both read
-- these instead of scanning events.  One row per account, day and key.
CREATE TABLE daily_counts (
    account_id @BIGINT@ NOT NULL,
    day TEXT NOT NULL,
    dimension TEXT NOT NULL DEFAULT '',
    metric TEXT NOT NULL,
    value @BIGINT@ NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, day, dimension, metric)
);

CREATE TABLE webhooks (
    id @ID@,
    account_id @BIGINT@ NOT NULL REFERENCES accounts (id),
    url TEXT NOT NULL,
    event_types TEXT NOT NULL DEFAULT '',
    secret TEXT NOT NULL,
    failing @BOOL@ NOT NULL DEFAULT @FALSE@,
    created_at @REAL@ NOT NULL
);

CREATE TABLE webhook_attempts (
    id @ID@,
    webhook_id @BIGINT@ NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    ts @REAL@ NOT NULL,
    status INTEGER,
    error TEXT,
    events INTEGER NOT NULL
);
