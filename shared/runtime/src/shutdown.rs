//! The one way a Cohort daemon learns it must stop: SIGTERM (systemd) or
//! SIGINT (a terminal), turned into a `watch` that every task can wait on.

use tokio::sync::watch;

/// Waits for SIGTERM or SIGINT. Without signal handlers it waits forever
/// (the process then only stops with SIGKILL), and says so.
pub async fn signalled() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
        }
    }
}

/// A shutdown signal that turns `true` on SIGTERM or SIGINT, after telling
/// systemd STOPPING: what the daemons' `serve(config, .., shutdown)` take.
/// Tests make their own with `tokio::sync::watch::channel(false)`.
pub fn on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signalled().await;
        crate::service::notify_stopping();
        let _ = tx.send(true);
    });
    rx
}

/// Returns once `shutdown` is `true` (or its sender is gone).
pub async fn requested(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
