//! TLS for the control plane's QUIC, server side: the server's certificate, made self-signed
//! on first start and kept beside its database. Clients trust it by its fingerprint or a CA
//! file ([`shoal_link::Trust`]). TLS 1.3 only, ring as the crypto provider.

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
pub use shoal_link::{ALPN, HOSTING_ALPN, RELAY_ALPN, SERVER_NAME, fingerprint};
use shoal_protocol::control::MAX_CONTROL_FRAME;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Reading or writing the key or certificate failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// Generating the certificate failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// rustls or quinn refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The server's certificate and key.
#[derive(Debug)]
pub struct ServerIdentity {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl ServerIdentity {
    /// Loads `control-cert.der` and `control-key.der` from `dir`, or makes a self-signed pair
    /// there on first start (the key readable by its owner only).
    pub fn load_or_create(dir: &Path) -> Result<ServerIdentity, TlsError> {
        let (cert_path, key_path) = (dir.join("control-cert.der"), dir.join("control-key.der"));
        let io = |p: &Path, source| TlsError::Io { path: p.display().to_string(), source };
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read(&cert_path).map_err(|e| io(&cert_path, e))?;
            let key = std::fs::read(&key_path).map_err(|e| io(&key_path, e))?;
            return Ok(ServerIdentity { cert: CertificateDer::from(cert), key: PrivatePkcs8KeyDer::from(key) });
        }
        let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let cert = params.self_signed(&key).map_err(|e| TlsError::Generate(e.to_string()))?;
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        write_private(&key_path, &key.serialize_der()).map_err(|e| io(&key_path, e))?;
        std::fs::write(&cert_path, cert.der()).map_err(|e| io(&cert_path, e))?;
        Ok(ServerIdentity { cert: cert.der().clone(), key: PrivatePkcs8KeyDer::from(key.serialize_der()) })
    }

    /// The certificate's fingerprint, which clients pin.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(self.cert.as_ref())
    }

    /// The QUIC server configuration.
    pub fn server_config(&self) -> Result<quinn::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = PrivateKeyDer::Pkcs8(self.key.clone_key());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec(), RELAY_ALPN.to_vec(), HOSTING_ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        // A client speaks on one stream, and what it may have in flight there is bounded by
        // two of the largest frames: the server never buffers more than that for anyone.
        let window = quinn::VarInt::from_u32(2 * MAX_CONTROL_FRAME as u32);
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(1u32.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(window)
            .receive_window(window);
        config.transport_config(Arc::new(transport));
        Ok(config)
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shoal_link::{Trust, client_config};
    use std::net::SocketAddr;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Connects over real QUIC on loopback and exchanges one message on a stream.
    async fn handshake(server: &ServerIdentity, trust: &Trust) -> Result<Vec<u8>, String> {
        let ep = quinn::Endpoint::server(server.server_config().unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let Some(incoming) = ep.accept().await else { return };
            let Ok(conn) = incoming.await else { return };
            if let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let got = recv.read_to_end(1024).await.unwrap_or_default();
                let _ = send.write_all(&got).await;
                let _ = send.finish();
                let _ = conn.closed().await;
            }
        });
        let mut client = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        client.set_default_client_config(client_config(trust).map_err(|e| e.to_string())?);
        let conn = client.connect(addr, SERVER_NAME).unwrap().await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"hello").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let back = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
        conn.close(0u32.into(), b"done");
        accept.abort();
        Ok(back)
    }

    #[tokio::test]
    async fn a_pinned_client_reaches_the_server_and_a_wrong_pin_does_not() {
        let d = dir("pin");
        let server = ServerIdentity::load_or_create(&d).unwrap();
        assert_eq!(handshake(&server, &Trust::Pinned(server.fingerprint())).await.unwrap(), b"hello");
        let mut wrong = server.fingerprint();
        wrong[0] ^= 1;
        let err = handshake(&server, &Trust::Pinned(wrong)).await.unwrap_err();
        assert!(err.contains("certificate") || err.contains("handshake"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn the_certificate_survives_a_restart() {
        let d = dir("keep");
        let first = ServerIdentity::load_or_create(&d).unwrap();
        let again = ServerIdentity::load_or_create(&d).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        // A client pinned to the first start still reaches the restarted server.
        assert_eq!(handshake(&again, &Trust::Pinned(first.fingerprint())).await.unwrap(), b"hello");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(d.join("control-key.der")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key must be private to its owner");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_ca_file_trusts_the_certificate_it_holds() {
        let d = dir("ca");
        let server = ServerIdentity::load_or_create(&d).unwrap();
        // The self-signed certificate is its own CA; the file may be DER as well as PEM.
        let ca = d.join("ca.der");
        std::fs::write(&ca, server.cert.as_ref()).unwrap();
        assert_eq!(handshake(&server, &Trust::CaFile(ca)).await.unwrap(), b"hello");
        // Another server's certificate is not trusted by that file.
        let other = ServerIdentity::load_or_create(&dir("ca-other")).unwrap();
        assert!(handshake(&other, &Trust::CaFile(d.join("ca.der"))).await.is_err());
        let _ = std::fs::remove_dir_all(&d);
    }
}
