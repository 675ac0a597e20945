-- Starcite archive schema, version 1. Applied once, inside the migration transaction
-- (src/archive/schema.rs), after the meta row was checked. Never edit a migration that
-- has shipped: add the next numbered file instead.

-- Every committed event, keyed by (session_id, seq). JSON values are `json` (not
-- `jsonb`): Postgres keeps `json` text byte for byte, so reads return exactly what the
-- API serves. `COLLATE "C"` orders ids bytewise, like the API's listings.
CREATE TABLE events (
    session_id      text COLLATE "C" NOT NULL,
    seq             bigint NOT NULL CHECK (seq >= 1),
    inserted_at     timestamptz NOT NULL,
    type            text NOT NULL,
    payload         json NOT NULL,
    actor           text,
    source          text,
    metadata        json NOT NULL,
    refs            json NOT NULL,
    idempotency_key text,
    producer_id     text,
    producer_seq    bigint CHECK (producer_seq >= 1),
    -- The 128-bit content digest the dedupe rules compare (shards::json::content_digest).
    digest          bytea NOT NULL CHECK (length(digest) = 16),
    PRIMARY KEY (session_id, seq)
);

-- The session catalog, upserted only forward: a row with a lower version never
-- replaces a higher one, and archived_seq only grows (GREATEST).
CREATE TABLE sessions (
    id           text COLLATE "C" PRIMARY KEY,
    title        text,
    metadata     json NOT NULL,
    version      bigint NOT NULL CHECK (version >= 1),
    archived     boolean NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    archived_seq bigint NOT NULL DEFAULT 0 CHECK (archived_seq >= 0)
);
