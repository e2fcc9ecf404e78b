//! The metrics of client credentials: fallbacks used, and the secrets the broker rotates.

use std::time::SystemTime;

use metrics::{Counter, Key, Label, Recorder as _};

use super::{CREDENTIAL_FALLBACKS, METADATA, Metrics, environment_labels};

/// Client secret rotations, by tenant, environment and outcome (rotated, failed).
pub const SECRET_ROTATIONS: &str = "token_broker_client_secret_rotations_total";
/// When the secret in force was rotated, Unix seconds, by tenant and environment.
pub const SECRET_ROTATED_AT: &str = "token_broker_client_secret_rotated_timestamp_seconds";
/// When the next scheduled rotation is due, Unix seconds (environments with `rotation.every`).
pub const SECRET_ROTATION_DUE: &str = "token_broker_client_secret_rotation_due_timestamp_seconds";

/// Unix seconds of `at` (0 before the epoch).
fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

impl Metrics {
    /// Counts one token fetched with `tenant`/`environment`'s fallback credential.
    pub fn credential_fallback(&self, tenant: &str, environment: &str) {
        let key = Key::from_parts(
            CREDENTIAL_FALLBACKS,
            environment_labels(tenant, environment),
        );
        self.inner
            .recorder
            .register_counter(&key, &METADATA)
            .increment(1);
    }

    /// Counts one rotation of `tenant`/`environment`'s client secret, `rotated` or `failed`.
    pub fn secret_rotation(&self, tenant: &str, environment: &str, outcome: &'static str) {
        self.rotation_counter(tenant, environment, outcome)
            .increment(1);
    }

    /// Shows `tenant`/`environment`'s rotation counters from the start, at zero, so that an
    /// alert sees the first failure as an increase.
    pub fn register_rotation(&self, tenant: &str, environment: &str) {
        for outcome in ["rotated", "failed"] {
            let _registered = self.rotation_counter(tenant, environment, outcome);
        }
    }

    fn rotation_counter(&self, tenant: &str, environment: &str, outcome: &'static str) -> Counter {
        let mut labels = environment_labels(tenant, environment);
        labels.push(Label::from_static_parts("outcome", outcome));
        let key = Key::from_parts(SECRET_ROTATIONS, labels);
        self.inner.recorder.register_counter(&key, &METADATA)
    }

    /// Sets when the client secret in force for `tenant`/`environment` was rotated.
    pub fn secret_rotated_at(&self, tenant: &str, environment: &str, at: SystemTime) {
        let key = Key::from_parts(SECRET_ROTATED_AT, environment_labels(tenant, environment));
        self.inner
            .recorder
            .register_gauge(&key, &METADATA)
            .set(unix_seconds(at));
    }

    /// Sets when the next scheduled rotation of `tenant`/`environment` is due.
    pub fn secret_rotation_due(&self, tenant: &str, environment: &str, at: SystemTime) {
        let key = Key::from_parts(SECRET_ROTATION_DUE, environment_labels(tenant, environment));
        self.inner
            .recorder
            .register_gauge(&key, &METADATA)
            .set(unix_seconds(at));
    }
}
