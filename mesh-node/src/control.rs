//! The client side of the control plane: how a relay or a player's client reaches the control
//! server over QUIC, trusts its certificate, and exchanges length-prefixed messages with it.
//!
//! A client trusts the server by the certificate's SHA-256 fingerprint (pinned in its config,
//! as a studio ships it) or by a CA file (PEM or DER) for studios with their own PKI. TLS 1.3
//! only, ring as the crypto provider, ALPN [`ALPN`].
//!
//! Each side sends frames of a u32 big-endian length followed by a [`shoal_protocol::codec`]
//! frame of at most [`MAX_CONTROL_FRAME`] bytes, on one bidirectional stream the client opens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_protocol::codec::{self, CodecError};
use shoal_protocol::control::MAX_CONTROL_FRAME;
use shoal_protocol::identity::parse_hex;

/// The ALPN protocol of Shoal's control plane.
pub const ALPN: &[u8] = b"shoal-control/1";
/// The ALPN protocol relays speak to the control server (`RelayToControl` / `ControlToRelay`).
pub const RELAY_ALPN: &[u8] = b"shoal-relay/1";
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

/// How a client decides to trust the control server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The certificate whose SHA-256 is this.
    Pinned([u8; 32]),
    /// Certificates chaining to a CA in this file (PEM, or one DER certificate).
    CaFile(PathBuf),
}

impl std::str::FromStr for Trust {
    type Err = String;

    /// `sha256:<64 hex>` pins a fingerprint; anything else names a CA file.
    fn from_str(s: &str) -> Result<Trust, String> {
        match s.strip_prefix("sha256:") {
            Some(hex) => parse_hex(hex).map(Trust::Pinned).map_err(|e| format!("fingerprint: {e}")),
            None if s.is_empty() => Err("empty trust".into()),
            None => Ok(Trust::CaFile(PathBuf::from(s))),
        }
    }
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
    /// The QUIC handshake failed (unreachable server, wrong certificate).
    #[error("connecting to the control server: {0}")]
    Connect(String),
    /// The connection or stream ended.
    #[error("control connection closed: {0}")]
    Closed(String),
    /// The peer sent a frame larger than [`MAX_CONTROL_FRAME`].
    #[error("control frame of {0} bytes is too large")]
    Oversized(usize),
    /// A frame that does not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Accepts exactly the certificate with a pinned fingerprint; handshake signatures are still
/// checked with the provider's algorithms, so only the holder of its key passes.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // A fingerprint is public: a plain comparison is fine.
        if fingerprint(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The QUIC client configuration for reaching a control server trusted as `trust` says, as a
/// player's client.
pub fn client_config(trust: &Trust) -> Result<quinn::ClientConfig, LinkError> {
    config_for(trust, ALPN)
}

fn config_for(trust: &Trust, alpn: &[u8]) -> Result<quinn::ClientConfig, LinkError> {
    let config = |e: &dyn std::fmt::Display| LinkError::Config(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config(&e))?;
    let mut tls = match trust {
        Trust::Pinned(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { fingerprint: *fingerprint, provider }))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let in_file = |e: &dyn std::fmt::Display| LinkError::Config(format!("{}: {e}", path.display()));
            let bytes = std::fs::read(path).map_err(|e| in_file(&e))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                roots.add(cert.map_err(|e| in_file(&e))?).map_err(|e| in_file(&e))?;
            }
            if roots.is_empty() {
                // Not PEM: one DER certificate.
                roots.add(CertificateDer::from(bytes)).map_err(|e| in_file(&e))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| config(&e))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// One message as it goes on the stream: its length, then its codec frame.
pub fn frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let body = codec::encode(msg)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads one frame's bytes (undecoded). A frame over [`MAX_CONTROL_FRAME`] is refused before
/// it is read; the stream cannot be resynchronised after it.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, LinkError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| LinkError::Closed(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(LinkError::Oversized(len));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| LinkError::Closed(e.to_string()))?;
    Ok(body)
}

/// Reads and decodes one message.
pub async fn read_message<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, LinkError> {
    Ok(codec::decode(&read_frame(recv).await?, MAX_CONTROL_FRAME)?)
}

/// Writes one message.
pub async fn write_message<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), LinkError> {
    send.write_all(&frame(msg)?).await.map_err(|e| LinkError::Closed(e.to_string()))
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
    pub recv: quinn::RecvStream,
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

    async fn connect_with(server: SocketAddr, trust: &Trust, alpn: &[u8]) -> Result<ControlLink, LinkError> {
        let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let local = if server.ip().is_loopback() { SocketAddr::new(server.ip(), 0) } else { local };
        let mut endpoint = quinn::Endpoint::client(local).map_err(LinkError::Socket)?;
        endpoint.set_default_client_config(config_for(trust, alpn)?);
        let connecting = endpoint.connect(server, SERVER_NAME).map_err(|e| LinkError::Connect(e.to_string()))?;
        let connection = connecting.await.map_err(|e| LinkError::Connect(e.to_string()))?;
        let (send, recv) = connection.open_bi().await.map_err(|e| LinkError::Connect(e.to_string()))?;
        Ok(ControlLink { endpoint, connection, send, recv })
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
        read_message(&mut self.recv).await
    }

    /// Closes the connection at once.
    pub fn close(&self, reason: &str) {
        self.connection.close(0u32.into(), reason.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn trust_parses_a_pin_or_a_ca_file() {
        let hex = "ab".repeat(32);
        assert_eq!(format!("sha256:{hex}").parse::<Trust>().unwrap(), Trust::Pinned([0xab; 32]));
        assert_eq!("ca.pem".parse::<Trust>().unwrap(), Trust::CaFile("ca.pem".into()));
        assert!("sha256:abc".parse::<Trust>().is_err());
        assert!("".parse::<Trust>().is_err());
    }
}
