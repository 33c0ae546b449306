//! Human durations: the job file's `stop_grace: 10s` / `hang_timeout: 1h30m`,
//! and the elapsed/remaining times that ms-swift prints (`8m 33s`, `1d 6h 54m 11s`).

use std::time::Duration;

/// The forms shown to the user when a duration does not parse.
const ACCEPTED_FORMS: &str = r#"a number with a unit, e.g. "30s", "10m", "1h30m", "500ms" or "1d 6h""#;

/// A duration that could not be parsed; names the text and the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {text:?}: {reason}; write {ACCEPTED_FORMS}")]
pub struct DurationError {
    text: String,
    reason: String,
}

impl DurationError {
    /// The text that failed to parse.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Parses a duration written with units, with or without spaces between the parts.
///
/// Job-file durations: `"30s"`, `"10m"`, `"2h"`, `"1h30m"`, `"500ms"`.
/// ms-swift log times: `"41s"`, `"8m 33s"`, `"1h 16m 54s"`, `"1d 6h 54m 11s"`.
/// A bare number (`"30"`) is rejected: seconds and milliseconds are both plausible.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError { text: text.to_owned(), reason: "it is empty".to_owned() });
    }
    humantime::parse_duration(trimmed).map_err(|err| DurationError { text: text.to_owned(), reason: err.to_string() })
}

/// Formats a duration so that [`parse_duration`] reads it back, e.g. `"1h 30m"`.
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

/// `#[serde(with = "cohort_shared::duration::serde_duration")]` for a `Duration`
/// written as `"30s"`; the `option` submodule does the same for `Option<Duration>`.
pub mod serde_duration {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    /// Writes the duration as text, e.g. `"1h 30m"`.
    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_duration(*duration))
    }

    /// Reads `"30s"`-style text. A bare number is an error that asks for a unit.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        deserializer.deserialize_any(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"a duration with a unit such as "30s", "10m" or "1h30m""#)
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
            super::parse_duration(text).map_err(E::custom)
        }

        fn visit_u64<E: de::Error>(self, number: u64) -> Result<Duration, E> {
            Err(bare_number(number))
        }

        fn visit_i64<E: de::Error>(self, number: i64) -> Result<Duration, E> {
            Err(bare_number(number))
        }

        fn visit_f64<E: de::Error>(self, number: f64) -> Result<Duration, E> {
            Err(bare_number(number))
        }
    }

    fn bare_number<E: de::Error>(number: impl fmt::Display) -> E {
        E::custom(format!(r#"{number} has no unit; write e.g. "{number}s" or "{number}m""#))
    }

    /// The same for `Option<Duration>`: `None` is written as null / left out.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Writes `Some` as text and `None` as a unit/null.
        pub fn serialize<S: Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
            match duration {
                Some(duration) => super::serialize(duration, serializer),
                None => serializer.serialize_none(),
            }
        }

        /// Reads null as `None`, text as `Some`.
        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct Text(#[serde(with = "super")] Duration);
            Ok(Option::<Text>::deserialize(deserializer)?.map(|Text(duration)| duration))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secs(text: &str) -> u64 {
        parse_duration(text).unwrap().as_secs()
    }

    #[test]
    fn job_file_forms() {
        assert_eq!(secs("30s"), 30);
        assert_eq!(secs("10m"), 600);
        assert_eq!(secs("2h"), 7200);
        assert_eq!(secs("1h30m"), 5400);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(secs(" 45s "), 45);
    }

    #[test]
    fn ms_swift_log_forms() {
        assert_eq!(secs("41s"), 41);
        assert_eq!(secs("8m 33s"), 8 * 60 + 33);
        assert_eq!(secs("1h 16m 54s"), 3600 + 16 * 60 + 54);
        assert_eq!(secs("1d 6h 54m 11s"), 111_251);
        assert_eq!(secs("7h 59m 54s"), 7 * 3600 + 59 * 60 + 54);
    }

    #[test]
    fn errors_name_the_text_and_the_accepted_form() {
        for bad in ["30", "", "two", "5 parsecs", "-3s"] {
            let err = parse_duration(bad).unwrap_err();
            assert_eq!(err.text(), bad);
            let message = err.to_string();
            assert!(message.contains(&format!("{bad:?}")), "{message}");
            assert!(message.contains(r#""1h30m""#), "{message}");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for d in [
            Duration::from_secs(0),
            Duration::from_millis(500),
            Duration::from_secs(5400),
            Duration::from_secs(111_251),
        ] {
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Timeouts {
        #[serde(with = "serde_duration")]
        grace: Duration,
        #[serde(with = "serde_duration::option", default)]
        hang: Option<Duration>,
    }

    #[test]
    fn serde_helpers_read_and_write_text() {
        let parsed: Timeouts = serde_json::from_str(r#"{"grace":"10s","hang":"1h30m"}"#).unwrap();
        assert_eq!(parsed, Timeouts { grace: Duration::from_secs(10), hang: Some(Duration::from_secs(5400)) });
        let json = serde_json::to_string(&parsed).unwrap();
        assert_eq!(json, r#"{"grace":"10s","hang":"1h 30m"}"#);
        assert_eq!(serde_json::from_str::<Timeouts>(&json).unwrap(), parsed);

        let absent: Timeouts = serde_json::from_str(r#"{"grace":"1m","hang":null}"#).unwrap();
        assert_eq!(absent.hang, None);
        let missing: Timeouts = serde_json::from_str(r#"{"grace":"1m"}"#).unwrap();
        assert_eq!(missing.hang, None);
    }

    #[test]
    fn serde_rejects_bare_numbers_with_the_fix() {
        let err = serde_json::from_str::<Timeouts>(r#"{"grace":30}"#).unwrap_err();
        assert!(err.to_string().contains(r#"write e.g. "30s""#), "{err}");
        let err = serde_json::from_str::<Timeouts>(r#"{"grace":"soon"}"#).unwrap_err();
        assert!(err.to_string().contains(r#""soon""#), "{err}");
    }
}
