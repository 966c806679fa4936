//! Where the controller reads the time. The engine never does: the driver
//! passes `now` in with every event.
//!
//! Code that decides by time (the fleet's startup grace and lost timer, the
//! driver's deadlines and backout wait) takes a [`Clock`]: the daemon gives
//! it [`Clock::system`], tests give it [`Clock::tokio`] and run on tokio's
//! paused clock (`tokio::time::pause`/`advance`), so the wall time they
//! read and the timers they sleep on move together.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::rollout::Millis;

/// A source of the current time (ms since the UNIX epoch). Cheap to copy.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Source);

#[derive(Clone, Copy, Debug)]
enum Source {
    /// The system's wall clock.
    System,
    /// The wall time when it was made, plus the time elapsed on tokio's
    /// clock since.
    Tokio {
        wall: Millis,
        start: tokio::time::Instant,
    },
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Clock {
        Clock(Source::System)
    }

    /// Driven by tokio's clock: the wall time now, then moving as
    /// `tokio::time::Instant` does (so `tokio::time::pause()` stops it and
    /// `advance()` moves it). Must be made inside a runtime.
    pub fn tokio() -> Clock {
        Clock(Source::Tokio {
            wall: now(),
            start: tokio::time::Instant::now(),
        })
    }

    /// Milliseconds since the UNIX epoch.
    pub fn now(&self) -> Millis {
        match self.0 {
            Source::System => now(),
            Source::Tokio { wall, start } => wall + start.elapsed().as_millis() as Millis,
        }
    }
}

/// The system's wall clock, in milliseconds since the UNIX epoch: for the
/// CLI and for timestamps that decide nothing.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_tokio_clock_moves_with_tokio_time() {
        let clock = Clock::tokio();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0, "a paused clock stands still");
        tokio::time::advance(std::time::Duration::from_secs(90)).await;
        assert_eq!(clock.now(), t0 + 90_000);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        assert_eq!(clock.now(), t0 + 90_250);
    }
}
