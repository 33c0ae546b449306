//! Limits on what clients may send: message sizes, job file size, and a
//! per-client rate limit on the job API. A refused call gets a gRPC status
//! that says which limit and how to get under it, and changes nothing.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tonic::{Request, Status};

/// The controller's limits (flags `--max-job-file-size`, `--max-request-size`,
/// `--max-agent-message-size`, `--api-rate-limit`, `--api-rate-burst`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApiLimits {
    /// The largest job file (YAML text) submit and plan accept.
    pub max_job_file_bytes: usize,
    /// The largest request message of the job API (tonic answers OUT_OF_RANGE above it).
    pub max_request_bytes: usize,
    /// The largest message an agent may send.
    pub max_agent_message_bytes: usize,
    /// Job-API calls per second each client (by address) may make on average; 0: unlimited.
    pub rate_per_second: u32,
    /// Calls a client may make in a burst above the rate.
    pub rate_burst: u32,
    /// How long checking one job file (parse and validation) may take,
    /// waiting for a free checker included (`--job-file-check-timeout`).
    pub job_file_check_timeout: Duration,
    /// The largest `sync:` archive (compressed) UploadSync stores (`--max-sync-bytes`).
    pub max_sync_bytes: u64,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_job_file_bytes: 1 << 20,
            max_request_bytes: 4 << 20,
            max_agent_message_bytes: 16 << 20,
            rate_per_second: 50,
            rate_burst: 200,
            job_file_check_timeout: Duration::from_secs(5),
            max_sync_bytes: cohort_shared::spec::sync::MAX_SYNC_BYTES,
        }
    }
}

/// The job API's per-client rate limit, as a tonic interceptor. Clients are
/// told apart by their address (behind a NAT or a standby controller several
/// share one budget). Calls without a peer address (in-process) pass.
#[derive(Clone)]
pub struct RateLimit {
    limiter: Option<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
    per_second: u32,
    burst: u32,
}

impl RateLimit {
    pub fn new(limits: &ApiLimits) -> Self {
        let limiter = NonZeroU32::new(limits.rate_per_second).map(|rate| {
            let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(rate);
            Arc::new(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
        });
        RateLimit { limiter, per_second: limits.rate_per_second, burst: limits.rate_burst }
    }

    /// Forgets clients idle long enough to have their whole burst back (keeps memory flat).
    pub fn spawn_cleanup(&self) {
        if let Some(limiter) = self.limiter.clone() {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            });
        }
    }

    /// Admits or refuses one call.
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let (Some(limiter), Some(peer)) = (&self.limiter, request.remote_addr()) else {
            return Ok(request);
        };
        match limiter.check_key(&peer.ip()) {
            Ok(()) => Ok(request),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                tracing::debug!(client = %peer.ip(), ?wait, "job API call over the rate limit");
                Err(Status::resource_exhausted(format!(
                    "rate limit: client {} made more than {} job-API calls per second (burst {}); retry in {} ms, or raise --api-rate-limit on the controller",
                    peer.ip(),
                    self.per_second,
                    self.burst,
                    wait.as_millis().max(1)
                )))
            }
        }
    }
}

/// `--max-job-file-size 1MiB`-style sizes.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let size: bytesize::ByteSize =
        text.trim().parse().map_err(|e| format!("{text:?}: {e}; e.g. 1MiB, 512KiB, 4000000"))?;
    usize::try_from(size.as_u64()).map_err(|_| format!("{text:?} is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn from(ip: [u8; 4]) -> Request<()> {
        let mut request = Request::new(());
        let addr = std::net::SocketAddr::from((ip, 40000));
        request
            .extensions_mut()
            .insert(tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: Some(addr) });
        request
    }

    #[test]
    fn a_client_over_its_burst_is_refused_others_are_not() {
        let limit = RateLimit::new(&ApiLimits { rate_per_second: 1, rate_burst: 3, ..ApiLimits::default() });
        for _ in 0..3 {
            assert!(limit.check(from([10, 0, 0, 1])).is_ok());
        }
        let refused = limit.check(from([10, 0, 0, 1])).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("client 10.0.0.1") && refused.message().contains("--api-rate-limit"));
        assert!(limit.check(from([10, 0, 0, 2])).is_ok(), "another client has its own budget");
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limit = RateLimit::new(&ApiLimits { rate_per_second: 0, ..ApiLimits::default() });
        for _ in 0..1000 {
            assert!(limit.check(from([10, 0, 0, 1])).is_ok());
        }
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4000"), Ok(4000));
        assert!(parse_size("lots").unwrap_err().contains("e.g. 1MiB"));
    }
}
