//! The daemons' side of systemd's `Type=notify`: READY once serving,
//! WATCHDOG pings while the runtime runs (only when systemd set WATCHDOG_USEC),
//! STOPPING on shutdown. Outside systemd (no NOTIFY_SOCKET) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;

/// Variables systemd gives the daemon that its children must not inherit: a
/// rank that pinged the watchdog or sent READY would speak for the daemon.
pub const NOTIFY_ENV: &[&str] = &["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Tells systemd the daemon is up, with a one-line status for `systemctl status`.
pub fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the daemon is shutting down.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// Pings systemd's watchdog at half its interval, from a task on the calling
/// tokio runtime: a runtime that stops making progress stops the pings, and
/// systemd restarts the daemon. Nothing happens without WATCHDOG_USEC.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = (interval / 2).max(Duration::from_millis(10));
    tracing::info!(?interval, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}
