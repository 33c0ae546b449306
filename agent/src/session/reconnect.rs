//! Which controller an agent dials next, and how long it waits first: the
//! next URL after a failed session, a standby's named leader at once, capped
//! exponential backoff with jitter, reset after a session that lasted. Also
//! what cohort-bench's simulated agents do, so they reconnect as real ones.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// A session that lasted this long starts the backoff over.
const LASTED: Duration = Duration::from_secs(30);

pub struct Reconnect {
    urls: Vec<String>,
    next: usize,
    redirect: Option<String>,
    max_backoff: Duration,
    delays: ExponentialBackoff,
}

impl Reconnect {
    /// `urls` must not be empty.
    pub fn new(urls: Vec<String>, max_backoff: Duration) -> Self {
        Reconnect { urls, next: 0, redirect: None, max_backoff, delays: backoff(max_backoff) }
    }

    /// The controller to dial now: a leader a standby named, else the next in turn.
    pub fn url(&mut self) -> String {
        self.redirect.take().unwrap_or_else(|| self.urls[self.next % self.urls.len()].clone())
    }

    /// A standby named `leader`: the next [`Reconnect::url`] is it, with no wait.
    pub fn redirect_to(&mut self, leader: String) {
        self.redirect = Some(leader);
    }

    /// A session that `lasted` this long ended: moves to the next controller
    /// and returns how long to wait before dialling it.
    pub fn failed(&mut self, lasted: Duration) -> Duration {
        self.next += 1;
        if lasted > LASTED {
            self.delays = backoff(self.max_backoff);
        }
        self.delays.next().unwrap_or(self.max_backoff)
    }
}

fn backoff(max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

/// A standby's refusal ends with "leader: <url>" when it knows the leader.
pub fn leader_hint(message: &str) -> Option<String> {
    message.rsplit_once("leader: ").map(|(_, url)| url.trim().to_string()).filter(|u| !u.is_empty())
}

/// How long a session may go without a HeartbeatAck before it is abandoned
/// for another controller (a silent partition keeps TCP open): well before
/// the fence.
pub fn silent_limit(heartbeat_interval: Duration, fence_after: Duration) -> Duration {
    (heartbeat_interval * 5).max(Duration::from_secs(3)).min(fence_after / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_through_the_urls_and_goes_to_a_named_leader_at_once() {
        let mut r = Reconnect::new(vec!["a".into(), "b".into()], Duration::from_secs(10));
        assert_eq!(r.url(), "a");
        assert!(r.failed(Duration::ZERO) <= Duration::from_secs(10));
        assert_eq!(r.url(), "b");
        r.redirect_to("leader".into());
        assert_eq!(r.url(), "leader");
        assert_eq!(r.url(), "b", "a redirect is used once");
        assert_eq!(leader_hint("not leading; leader: http://c:7070"), Some("http://c:7070".into()));
        assert_eq!(leader_hint("not leading"), None);
        assert_eq!(silent_limit(Duration::from_secs(1), Duration::from_secs(30)), Duration::from_secs(5));
    }
}
