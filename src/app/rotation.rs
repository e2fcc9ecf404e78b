//! Scheduled client secret rotations (`rotation.every`): each environment's secret is rotated
//! `every` after the rotation in force (the broker's, or a manual one it noticed), or soon after
//! start when its age is unknown (the broker never rotated it). A failed rotation is tried again after a backoff that doubles from a
//! minute up to an hour. In a fleet every replica keeps the schedule and the shared lock makes
//! one rotation of it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::AppState;

/// How often the schedule is checked.
const CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// First wait after a failed scheduled rotation.
const RETRY_FIRST: Duration = Duration::from_secs(60);
/// Longest wait after failed scheduled rotations.
const RETRY_CAP: Duration = Duration::from_secs(3600);

/// Rotates every environment whose `rotation.every` has passed since its secret was rotated,
/// checking every minute of the broker's clock, until the task is aborted.
pub async fn rotate_when_due(state: AppState) {
    // After a failure: when to try again, and the wait after the next failure.
    let mut retries: HashMap<(Arc<str>, Arc<str>), (SystemTime, Duration)> = HashMap::new();
    loop {
        state.clock.sleep(CHECK_INTERVAL).await;
        let scheduled: Vec<_> = state
            .current()
            .settings
            .environments()
            .filter_map(|(_, _, environment)| {
                let every = environment.rotation.as_ref()?.every?;
                Some((Arc::clone(environment), every))
            })
            .collect();
        for (environment, every) in scheduled {
            let name = (
                Arc::clone(&environment.tenant),
                Arc::clone(&environment.environment),
            );
            let now = state.clock.now();
            // From the rotation in force, or the manual one that replaced the broker's.
            let due = match state.broker.secret_since(&environment).await {
                Some(since) => since.checked_add(every).unwrap_or(now),
                None => now,
            };
            state
                .metrics
                .secret_rotation_due(&environment.tenant, &environment.environment, due);
            let retry = retries.get(&name).copied();
            if now < due || retry.is_some_and(|(at, _)| now < at) {
                continue;
            }
            let Some(authority) = environment.rotation.as_ref().and_then(|rotation| {
                let (tenant, name) = &rotation.authorized_by;
                state.current().settings.environment(tenant, name).cloned()
            }) else {
                continue;
            };
            match state.broker.rotate_secret(&environment, &authority).await {
                Ok(_) => {
                    retries.remove(&name);
                }
                Err(_) => {
                    // Logged and counted by the broker.
                    let wait = retry.map_or(RETRY_FIRST, |(_, wait)| wait);
                    let again = now.checked_add(wait).unwrap_or(now);
                    retries.insert(name, (again, wait.saturating_mul(2).min(RETRY_CAP)));
                }
            }
        }
    }
}
