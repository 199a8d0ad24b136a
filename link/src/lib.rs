//! The client side of Shoal's control plane: how a player's client (the SDK), a relay or a
//! hosting server reaches the control server over QUIC, trusts its certificate ([`Trust`]),
//! and exchanges messages with it ([`ControlLink`]); and, in [`daemon`], the few helpers both
//! daemons share, with (feature `metrics`) the Prometheus exposition in [`exposition`].
//!
//! TLS 1.3 only, ring as the crypto provider, ALPN [`ALPN`] for players and [`RELAY_ALPN`] for
//! relays. Each side sends frames of [`shoal_protocol::framing`] (a u32 big-endian length,
//! then a [`shoal_protocol::codec`] frame of at most
//! [`MAX_CONTROL_FRAME`](shoal_protocol::control::MAX_CONTROL_FRAME) bytes) on one
//! bidirectional stream the client opens.

pub mod daemon;
#[cfg(feature = "metrics")]
pub mod exposition;
mod stream;
mod trust;

use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_protocol::framing::FrameError;
use shoal_protocol::identity::to_hex;

pub use stream::{FrameReader, write_message};
pub use trust::{Trust, TrustError, client_config};

/// The ALPN protocol of Shoal's control plane.
pub const ALPN: &[u8] = b"shoal-control/1";
/// The ALPN protocol relays speak to the control server (`RelayToControl` / `ControlToRelay`).
pub const RELAY_ALPN: &[u8] = b"shoal-relay/1";
/// The ALPN protocol hosting servers speak to the control server (`HostingToControl` /
/// `ControlToHosting`).
pub const HOSTING_ALPN: &[u8] = b"shoal-hosting/1";
/// The ALPN protocol clients speak to a hosting server (`ClientToHost` / `HostToClient`).
pub const WORLD_ALPN: &[u8] = b"shoal-world/1";
/// The name the server's certificate is issued for; clients that pin a fingerprint use it as
/// the server name.
pub const SERVER_NAME: &str = "shoal-control";

/// A certificate's SHA-256 fingerprint.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut f = [0; 32];
    f.copy_from_slice(d.as_ref());
    f
}

/// Why the control link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The trust setting could not be turned into a TLS configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Binding the local QUIC socket failed.
    #[error("local socket: {0}")]
    Socket(std::io::Error),
    /// The server presented a certificate other than the pinned one.
    #[error(
        "the server's certificate fingerprint sha256:{} does not match the pinned sha256:{}",
        to_hex(.presented),
        to_hex(.pinned)
    )]
    FingerprintMismatch {
        /// The fingerprint of the certificate the server presented.
        presented: [u8; 32],
        /// The fingerprint the client trusts.
        pinned: [u8; 32],
    },
    /// The QUIC handshake failed (unreachable server, certificate not trusted).
    #[error("connecting to the control server: {0}")]
    Connect(String),
    /// The connection or stream ended.
    #[error("control connection closed: {0}")]
    Closed(String),
    /// A frame over the size limit, or one that does not decode.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// An open control connection: the QUIC connection and its one stream.
#[derive(Debug)]
pub struct ControlLink {
    /// The QUIC endpoint (kept so the connection outlives no socket).
    pub endpoint: quinn::Endpoint,
    /// The connection.
    pub connection: quinn::Connection,
    /// Where messages go.
    pub send: quinn::SendStream,
    /// Where messages come from.
    pub recv: FrameReader,
}

impl ControlLink {
    /// Connects to the control server at `server` as a player's client and opens the message
    /// stream.
    pub async fn connect(server: SocketAddr, trust: &Trust) -> Result<ControlLink, LinkError> {
        ControlLink::connect_with(server, trust, ALPN).await
    }

    /// Connects as a relay.
    pub async fn connect_relay(server: SocketAddr, trust: &Trust) -> Result<ControlLink, LinkError> {
        ControlLink::connect_with(server, trust, RELAY_ALPN).await
    }

    /// Connects as a hosting server.
    pub async fn connect_hosting(server: SocketAddr, trust: &Trust) -> Result<ControlLink, LinkError> {
        ControlLink::connect_with(server, trust, HOSTING_ALPN).await
    }

    /// Connects to a server speaking `alpn` (a hosting server, for [`WORLD_ALPN`]).
    pub async fn connect_with(server: SocketAddr, trust: &Trust, alpn: &[u8]) -> Result<ControlLink, LinkError> {
        let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let local = if server.ip().is_loopback() { SocketAddr::new(server.ip(), 0) } else { local };
        let mut endpoint = quinn::Endpoint::client(local).map_err(LinkError::Socket)?;
        let (config, presented) = trust::config_for(trust, alpn)?;
        endpoint.set_default_client_config(config);
        let connecting = endpoint.connect(server, SERVER_NAME).map_err(|e| LinkError::Connect(e.to_string()))?;
        let connection = connecting.await.map_err(|e| match (trust, presented.get()) {
            (Trust::Pinned(pinned), Some(presented)) => {
                LinkError::FingerprintMismatch { presented: *presented, pinned: *pinned }
            }
            _ => LinkError::Connect(e.to_string()),
        })?;
        let (send, recv) = connection.open_bi().await.map_err(|e| LinkError::Connect(e.to_string()))?;
        Ok(ControlLink { endpoint, connection, send, recv: FrameReader::new(recv) })
    }

    /// The fingerprint of the certificate the server presented (what a key proof is bound to).
    pub fn server_fingerprint(&self) -> Option<[u8; 32]> {
        let certs = self.connection.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        Some(fingerprint(certs.first()?))
    }

    /// Sends one message.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), LinkError> {
        write_message(&mut self.send, msg).await
    }

    /// Receives one message.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, LinkError> {
        self.recv.read_message().await
    }

    /// Closes the connection at once.
    pub fn close(&self, reason: &str) {
        self.connection.close(0u32.into(), reason.as_bytes());
    }
}
