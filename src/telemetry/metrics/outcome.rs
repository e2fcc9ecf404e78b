//! The `outcome` label of IdP requests: a closed list, so its counters can be ready per slot.

/// What became of one token request to an IdP, the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdpOutcome {
    /// A token.
    Ok,
    /// A 4xx other than 429.
    Rejected,
    /// A 429.
    RateLimited,
    /// No answer in time.
    Timeout,
    /// No connection, or a broken one.
    Connect,
    /// A 5xx.
    ServerError,
    /// A 2xx that is not a usable token.
    InvalidResponse,
    /// An answer longer than `max_response_bytes`.
    ResponseTooLarge,
    /// Not sent: the environment's `max_fetches_per_hour` was spent.
    QuotaExhausted,
    /// Not sent: the `private_key_jwt` assertion could not be signed.
    SigningFailed,
}

impl IdpOutcome {
    /// Every outcome, in label order.
    pub const ALL: [Self; 10] = [
        Self::Ok,
        Self::Rejected,
        Self::RateLimited,
        Self::Timeout,
        Self::Connect,
        Self::ServerError,
        Self::InvalidResponse,
        Self::ResponseTooLarge,
        Self::QuotaExhausted,
        Self::SigningFailed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::RateLimited => "rate_limited",
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::ServerError => "server_error",
            Self::InvalidResponse => "invalid_response",
            Self::ResponseTooLarge => "response_too_large",
            Self::QuotaExhausted => "quota_exhausted",
            Self::SigningFailed => "signing_failed",
        }
    }

    /// Its slot in [`Self::ALL`], which lists the variants in declaration order.
    pub(super) fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_outcome_indexes_its_own_slot() {
        for (slot, outcome) in IdpOutcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), slot, "{outcome:?}");
        }
    }
}
