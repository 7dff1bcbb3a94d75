-- smsauth schema 2: WeChat as a second login method (seed 000's `WX` rows), the avatar
-- it gives, and short-lived single-use grants (WeChat's OAuth states and tickets).

ALTER TABLE users ADD COLUMN avatar_url text;

-- A WeChat id belongs to one account at most: racing binds of one id, on any instance,
-- are decided here. 3 is `wechat` in login_methods.method.
CREATE UNIQUE INDEX login_methods_wechat_id ON login_methods (identification) WHERE method = 3;

-- Kept under the SHA-256 of their token, so the table holds nothing that would work if
-- copied out of it. Logged: a 2xx that hands out a grant means it is committed.
CREATE TABLE grants (
    kind       smallint NOT NULL,
    key        bytea    NOT NULL,
    value      bytea    NOT NULL,
    expires_at bigint   NOT NULL,
    PRIMARY KEY (kind, key)
);
