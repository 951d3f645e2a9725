//! Why a configuration cannot be used.

/// A configuration that cannot be used. Each error names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No backend was given.
    #[error("no backends configured")]
    NoBackends,
    /// A backend that does not parse.
    #[error("bad backend '{value}': {why}")]
    BadBackend {
        /// The value as given.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A backend host that does not resolve.
    #[error("cannot resolve backend '{value}': {why}")]
    Unresolvable {
        /// The value as given.
        value: String,
        /// The resolver's answer.
        why: String,
    },
    /// Two backends of one service with the same id.
    #[error("backend id '{id}' is given twice (give each backend its own id, or list it once with a weight)")]
    DuplicateBackend {
        /// The id.
        id: String,
    },
    /// A value outside the range its field allows.
    #[error("{field} {value} is out of range ({range})")]
    OutOfRange {
        /// The field, as the library names it (`idle_timeout`, `backend 'x' weight`, ...).
        field: String,
        /// The value as given.
        value: String,
        /// The range allowed.
        range: String,
    },
    /// A value that does not name anything known.
    #[error("unknown {field} '{value}' (expected {expected})")]
    Unknown {
        /// The field.
        field: &'static str,
        /// The value as given.
        value: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A value that cannot be used with the others, or on this platform.
    #[error("{field} '{value}' {why}")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// The value as given.
        value: String,
        /// Why not.
        why: &'static str,
    },
}

impl ConfigError {
    pub(crate) fn out_of_range(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        range: impl Into<String>,
    ) -> Self {
        ConfigError::OutOfRange {
            field: field.into(),
            value: value.to_string(),
            range: range.into(),
        }
    }
}
