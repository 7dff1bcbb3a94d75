-- smsauth schema 3: login sessions (one login and the chain of refresh tokens that
-- follows it) and their refresh tokens, kept as SHA-256 digests only. Neither is in a
-- backup: a restored service asks its users to log in again.

CREATE TABLE login_sessions (
    id           bytea    PRIMARY KEY,
    user_id      bigint   NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- The user's session_gen at the login: a bump ends the session.
    session_gen  bigint   NOT NULL,
    -- 1 sms, 2 password, 3 wechat (as login_methods.method).
    method       smallint NOT NULL,
    created_at   bigint   NOT NULL,
    last_used_at bigint   NOT NULL,
    -- When its newest refresh token expires.
    expires_at   bigint   NOT NULL,
    ip           text     NOT NULL,
    user_agent   text     NOT NULL,
    ended        boolean  NOT NULL DEFAULT false
);
CREATE INDEX login_sessions_user ON login_sessions (user_id);

-- A token is used up by setting used_at, in the one statement that stores its
-- successor; a used one stays until it expires, so that a late reuse is recognised.
CREATE TABLE refresh_tokens (
    hash       bytea  PRIMARY KEY,
    session_id bytea  NOT NULL REFERENCES login_sessions (id) ON DELETE CASCADE,
    expires_at bigint NOT NULL,
    used_at    bigint
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);
