//! Drivers that run the sans-IO cores on real UDP sockets with tokio.

pub mod batch;
pub mod endpoint;
pub mod register;
pub mod relay;

/// Resolves on SIGTERM or SIGINT (or Ctrl-C where the handlers cannot be installed): how the
/// daemons know to stop cleanly.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
