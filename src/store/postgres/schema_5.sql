-- smsauth schema 5: each account's login activity (logins, failed password logins,
-- logouts, password changes, WeChat bindings), kept privacy.activity_retention_days.
-- Deleted with its account (ON DELETE CASCADE), in the same commit.

CREATE TABLE login_activity (
    user_id    bigint   NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    at         bigint   NOT NULL,
    -- Tells apart entries of one user in one second.
    seq        bigint   NOT NULL,
    -- 1 login, 2 login_failed, 3 logout, 4 password_change, 5 wechat_bind.
    event      smallint NOT NULL,
    -- As login_methods.method; NULL for events without one.
    method     smallint,
    ip         text     NOT NULL,
    user_agent text     NOT NULL,
    PRIMARY KEY (user_id, at, seq)
);
-- For the housekeeping pass, which deletes by age.
CREATE INDEX login_activity_at ON login_activity (at);
