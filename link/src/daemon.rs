//! What both daemons (the `shoal-mesh-node` relay and `shoal-control-server`) need around
//! their sockets and links: their identity's key file, UDP socket setup, and the signal to stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use shoal_protocol::Identity;
use shoal_protocol::identity::{parse_hex, to_hex};

/// A key file that could not be read or created.
#[derive(Debug, thiserror::Error)]
#[error("key file {path}: {reason}")]
pub struct KeyFileError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Reads an identity seed (64 hex digits) from `path`, or creates the file with a new one,
/// readable by its owner only.
pub fn load_or_create_key(path: &Path) -> Result<Identity, KeyFileError> {
    let err = |reason: String| KeyFileError { path: path.into(), reason };
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Identity::from_seed(parse_hex(&text).map_err(|e| err(e.to_string()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Identity::generate().map_err(|e| err(e.to_string()))?;
            write_secret(path, &format!("{}\n", to_hex(id.seed()))).map_err(|e| err(e.to_string()))?;
            Ok(id)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// Writes a new file readable only by its owner (never over an existing one, so two processes
/// starting at once cannot each keep a different key).
fn write_secret(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

/// A non-blocking UDP socket bound to `addr`, its buffers enlarged to `buffer` bytes (best
/// effort: the kernel caps them at `net.core.[rw]mem_max`). With `reuse_port`, further sockets
/// may bind the same address (`SO_REUSEPORT`) and the kernel spreads senders over them.
pub fn bind_udp(addr: SocketAddr, buffer: usize, reuse_port: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Resolves on SIGTERM or SIGINT (or Ctrl-C where the handlers cannot be installed): how the
/// daemons know to stop cleanly.
///
/// The handlers are installed when this is called, not when the future is first polled: call
/// it inside the runtime before announcing readiness, so a signal sent at once is not fatal.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_key_file_is_made_private_once_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("shoal-link-key-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let made = load_or_create_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o077, 0);
        assert_eq!(load_or_create_key(&path).unwrap().node_id(), made.node_id());
        std::fs::write(&path, "not hex").unwrap();
        let e = load_or_create_key(&path).unwrap_err();
        assert!(e.to_string().starts_with(&format!("key file {}: expected 64 hex digits", path.display())), "{e}");
        let _ = std::fs::remove_file(&path);
    }
}
