//! Phone numbers: what users type becomes one E.164 string (`+8613812345678`), the key of
//! every per-phone record and limit, so writing a number another way changes nothing.

use regex::Regex;

use crate::config::PhoneConfig;
use crate::privacy::{PhoneIndex, PhoneVault};

/// A phone number in E.164 form, valid under the configured pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Phone(String);

impl Phone {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Trusted input only: a value this module produced earlier (e.g. read back from the store).
    pub fn from_e164(s: impl Into<String>) -> Self {
        Phone(s.into())
    }

    /// For logs and default nicknames: `+86138****5678`, never the full number.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

/// A phone number with its blind index ([`crate::privacy`]): what every record of the
/// phone is found by. Made once per request, so the index costs one HMAC (two while the
/// phone key rotates).
#[derive(Debug, Clone)]
pub struct IndexedPhone {
    pub phone: Phone,
    /// Under the current key: what new records are keyed by.
    pub index: PhoneIndex,
    /// Under a rotation's other key, while one runs ([`crate::rotation`]): records not
    /// moved yet, those of short life (codes, waits, counters) that are never moved, and
    /// those another instance made with the new key, are found by it too.
    pub other: Option<PhoneIndex>,
}

impl IndexedPhone {
    pub fn new(phone: Phone, vault: &PhoneVault) -> IndexedPhone {
        let (index, other) = vault.indexes(phone.as_str());
        IndexedPhone {
            phone,
            index,
            other,
        }
    }
}

impl std::ops::Deref for IndexedPhone {
    type Target = Phone;
    fn deref(&self) -> &Phone {
        &self.phone
    }
}

impl std::fmt::Display for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Masks the middle of a digit string, keeping a leading "+country" and the last four digits.
pub fn mask(s: &str) -> String {
    let n = s.chars().count();
    if n <= 7 {
        return "*".repeat(n);
    }
    let keep_head = if s.starts_with('+') {
        n.saturating_sub(8).min(6)
    } else {
        3
    };
    s.chars()
        .enumerate()
        .map(|(i, c)| if i < keep_head || i >= n - 4 { c } else { '*' })
        .collect()
}

/// Parses user input against the configured country code and national pattern.
pub struct PhoneParser {
    pattern: Regex,
    country_code: String,
}

impl PhoneParser {
    pub fn new(cfg: &PhoneConfig) -> Result<Self, regex::Error> {
        Ok(Self {
            pattern: Regex::new(&cfg.pattern)?,
            country_code: cfg.country_code.clone(),
        })
    }

    /// Accepts `13812345678`, `+8613812345678`, `008613812345678`, with spaces or dashes
    /// between digits. Only ASCII digits count: the regex `\d` would also match other
    /// scripts' digits, which no SMS gateway takes.
    pub fn parse(&self, input: &str) -> Option<Phone> {
        let input = input.trim();
        if input.is_empty() || input.len() > 32 {
            return None;
        }
        let (international, rest) = if let Some(r) = input.strip_prefix('+') {
            (true, r)
        } else if let Some(r) = input.strip_prefix("00") {
            (true, r)
        } else {
            (false, input)
        };
        let mut digits = String::with_capacity(rest.len());
        for c in rest.chars() {
            match c {
                '0'..='9' => digits.push(c),
                ' ' | '-' => {}
                _ => return None,
            }
        }
        let national = if international {
            digits.strip_prefix(self.country_code.as_str())?
        } else {
            digits.as_str()
        };
        if !self.pattern.is_match(national) {
            return None;
        }
        Some(Phone(format!("+{}{}", self.country_code, national)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> PhoneParser {
        PhoneParser::new(&PhoneConfig::default()).unwrap()
    }

    #[test]
    fn national_and_international_forms_agree() {
        let p = parser();
        let want = Some(Phone("+8613812345678".into()));
        for input in [
            "13812345678",
            "+8613812345678",
            "008613812345678",
            " 138-1234-5678 ",
            "+86 138 1234 5678",
        ] {
            assert_eq!(p.parse(input), want, "{input}");
        }
    }

    #[test]
    fn rejects_bad_numbers() {
        let p = parser();
        for input in [
            "",
            "1381234567",
            "138123456789",
            "12812345678",
            "+8513812345678",
            "+86",
            "abc",
            "13812345678\0",
            "１３８１２３４５６７８",
            "138١٢٣٤٥٦٧٨",
            "+8613812345678 ext 1",
        ] {
            assert_eq!(p.parse(input), None, "{input:?}");
        }
    }

    #[test]
    fn masks_the_middle() {
        assert_eq!(mask("+8613812345678"), "+86138****5678");
        assert_eq!(mask("13812345678"), "138****5678");
        assert_eq!(
            parser().parse("13812345678").unwrap().masked(),
            "+86138****5678"
        );
    }

    #[test]
    fn parse_is_idempotent() {
        let p = parser();
        let once = p.parse("13912345678").unwrap();
        assert_eq!(p.parse(once.as_str()), Some(once.clone()));
    }
}
