-- smsauth schema 6: shorter blind indexes.
-- The HMAC's first 16 bytes, base64url (22 characters), where
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
