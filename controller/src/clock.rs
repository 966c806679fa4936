//! The one place the controller reads the wall clock. The engine never
//! does: the driver passes `now` in with every event.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::rollout::Millis;

/// Milliseconds since the UNIX epoch.
pub fn now() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// `at` as RFC 3339 UTC, for people.
pub fn rfc3339(at: Millis) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(at as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
