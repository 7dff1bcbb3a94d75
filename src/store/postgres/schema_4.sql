-- smsauth schema 4: no phone number in the clear. Users keep theirs sealed
-- (AES-256-GCM, `phone_sealed`) and are found by its blind index (HMAC-SHA256,
-- `phone_index`); pending codes, resend waits and per-phone counters are keyed by the
-- index. The phone key is never in the database: `smsauth_schema.phone_key_id` only
-- names it, so an instance started with another key is refused.

ALTER TABLE smsauth_schema ADD COLUMN phone_key_id bytea;

ALTER TABLE users ADD COLUMN phone_index text, ADD COLUMN phone_sealed bytea;
ALTER TABLE users ALTER COLUMN phone DROP NOT NULL;
ALTER TABLE pending_codes RENAME COLUMN phone TO phone_index;
ALTER TABLE resend_waits RENAME COLUMN phone TO phone_index;
-- A password's identification is the phone, which the user row holds (sealed).
UPDATE login_methods SET identification = '' WHERE method = 2;

-- The phone numbers are sealed here by postgres/privacy.rs, in the same transaction:
-- smsauth: the phone numbers are sealed here

ALTER TABLE users DROP COLUMN phone;
ALTER TABLE users ALTER COLUMN phone_index SET NOT NULL, ALTER COLUMN phone_sealed SET NOT NULL;
ALTER TABLE users ADD CONSTRAINT users_phone_index_key UNIQUE (phone_index);
