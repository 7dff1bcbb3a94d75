-- smsauth schema 6: phone key rotation (`smsauth keys rotate-phone-key`).
-- The rotation's state (JSON: phases, key ids, key file names, the cursor; never a key),
-- one row at most.
CREATE TABLE phone_key_rotation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    state     text    NOT NULL
);
-- Every running instance, and which phase of a rotation it holds the keys for; the
-- rotation moves on when every instance heard from lately has caught up.
CREATE TABLE smsauth_instances (
    instance    text        PRIMARY KEY,
    -- The key id a rotation goes to, and its phase: 1 loading, 2 moving, 3 done;
    -- NULL and 0 without a rotation.
    rotation_to text,
    phase       smallint    NOT NULL,
    seen_at     timestamptz NOT NULL
);

-- Shorter blind indexes: the HMAC's first 16 bytes, base64url (22 characters), where
-- schema 5 kept all 32 (43 characters). Needs no key; only long indexes change.
UPDATE users SET phone_index =
    translate(rtrim(encode(substring(decode(translate(phone_index, '-_', '+/') || '=', 'base64') FROM 1 FOR 16), 'base64'), '='), '+/', '-_')
    WHERE length(phone_index) = 43;
UPDATE pending_codes SET phone_index =
    translate(rtrim(encode(substring(decode(translate(phone_index, '-_', '+/') || '=', 'base64') FROM 1 FOR 16), 'base64'), '='), '+/', '-_')
    WHERE length(phone_index) = 43;
UPDATE resend_waits SET phone_index =
    translate(rtrim(encode(substring(decode(translate(phone_index, '-_', '+/') || '=', 'base64') FROM 1 FOR 16), 'base64'), '='), '+/', '-_')
    WHERE length(phone_index) = 43;
UPDATE counters SET subject =
    translate(rtrim(encode(substring(decode(translate(subject, '-_', '+/') || '=', 'base64') FROM 1 FOR 16), 'base64'), '='), '+/', '-_')
    WHERE subject ~ '^[A-Za-z0-9_-]{43}$';
