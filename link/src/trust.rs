//! How a client trusts the control server: by its certificate's SHA-256 fingerprint (pinned in
//! its config, as a studio ships it) or by a CA file (PEM or DER) for studios with their own
//! PKI; and the TLS 1.3 client configuration that follows from it (ring as the provider).

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use shoal_protocol::identity::{HexError, parse_hex, to_hex};

use crate::{ALPN, LinkError, fingerprint};

/// How a client decides to trust the control server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The certificate whose SHA-256 is this.
    Pinned([u8; 32]),
    /// Certificates chaining to a CA in this file (PEM, or one DER certificate).
    CaFile(PathBuf),
}

/// Why a trust setting could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// Nothing was given.
    #[error("no trust given: expected a certificate fingerprint (sha256:<64 hex digits>) or a CA file")]
    Empty,
    /// `sha256:` followed by something other than 64 hex digits.
    #[error("`{input}` is not a certificate fingerprint: {source} after `sha256:`")]
    Fingerprint {
        /// What was given.
        input: String,
        /// What is wrong with the digits.
        source: HexError,
    },
    /// Neither a fingerprint nor the path of an existing file.
    #[error(
        "`{input}` is neither a certificate fingerprint (sha256:<64 hex digits>, or the 64 hex digits \
         `shoal-control-server fingerprint` prints) nor an existing CA file"
    )]
    Unrecognised {
        /// What was given.
        input: String,
    },
}

impl std::str::FromStr for Trust {
    type Err = TrustError;

    /// `sha256:<64 hex>` or 64 bare hex digits pin a fingerprint; the path of an existing file
    /// names a CA file.
    fn from_str(s: &str) -> Result<Trust, TrustError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TrustError::Empty);
        }
        if let Some(hex) = s.strip_prefix("sha256:") {
            return parse_hex(hex)
                .map(Trust::Pinned)
                .map_err(|source| TrustError::Fingerprint { input: s.into(), source });
        }
        if let Ok(pin) = parse_hex(s) {
            return Ok(Trust::Pinned(pin));
        }
        let path = PathBuf::from(s);
        if path.is_file() { Ok(Trust::CaFile(path)) } else { Err(TrustError::Unrecognised { input: s.into() }) }
    }
}

impl fmt::Display for Trust {
    /// The form [`Trust::from_str`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trust::Pinned(pin) => write!(f, "sha256:{}", to_hex(pin)),
            Trust::CaFile(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Accepts exactly the certificate with a pinned fingerprint; handshake signatures are still
/// checked with the provider's algorithms, so only the holder of its key passes. A certificate
/// with another fingerprint is refused, and its fingerprint kept for the error the caller sees.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    presented: Presented,
}

/// A pinned fingerprint that the server's certificate does not have.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate fingerprint sha256:{} does not match the pinned sha256:{}", to_hex(.presented), to_hex(.pinned))]
struct Mismatch {
    presented: [u8; 32],
    pinned: [u8; 32],
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
        let presented = fingerprint(end_entity);
        if presented == self.fingerprint {
            return Ok(ServerCertVerified::assertion());
        }
        let _ = self.presented.set(presented);
        let mismatch = Mismatch { presented, pinned: self.fingerprint };
        Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(mismatch)))))
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
    Ok(config_for(trust, ALPN)?.0)
}

/// Where a pinned verifier leaves the fingerprint of a certificate it refused.
pub(crate) type Presented = Arc<OnceLock<[u8; 32]>>;

/// The configuration for `alpn`, and where a pinned verifier leaves what it refused.
pub(crate) fn config_for(trust: &Trust, alpn: &[u8]) -> Result<(quinn::ClientConfig, Presented), LinkError> {
    let config = |e: &dyn fmt::Display| LinkError::Config(e.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| config(&e))?;
    let presented = Presented::default();
    let mut tls = match trust {
        Trust::Pinned(fingerprint) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                fingerprint: *fingerprint,
                provider,
                presented: presented.clone(),
            }))
            .with_no_client_auth(),
        Trust::CaFile(path) => {
            let in_file = |e: &dyn fmt::Display| LinkError::Config(format!("{}: {e}", path.display()));
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
    Ok((quinn::ClientConfig::new(Arc::new(quic)), presented))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn trust_parses_a_pin_with_or_without_its_prefix_or_a_ca_file() {
        let hex = "ab".repeat(32);
        assert_eq!(format!("sha256:{hex}").parse::<Trust>().unwrap(), Trust::Pinned([0xab; 32]));
        // As `shoal-control-server fingerprint` prints it.
        assert_eq!(hex.parse::<Trust>().unwrap(), Trust::Pinned([0xab; 32]));
        assert_eq!(format!(" sha256:{} ", hex.to_uppercase()).parse::<Trust>().unwrap(), Trust::Pinned([0xab; 32]));
        let ca = std::env::temp_dir().join(format!("shoal-link-ca-{}.pem", std::process::id()));
        std::fs::write(&ca, b"-").unwrap();
        assert_eq!(ca.display().to_string().parse::<Trust>().unwrap(), Trust::CaFile(ca.clone()));
        let _ = std::fs::remove_file(&ca);
        for t in [Trust::Pinned([0xab; 32]), Trust::Pinned([0; 32])] {
            assert_eq!(t.to_string().parse::<Trust>().unwrap(), t);
        }
    }

    #[test]
    fn a_bad_trust_says_what_it_was_given_and_what_would_do() {
        let e = "sha256:9f2c…".parse::<Trust>().unwrap_err();
        assert!(matches!(e, TrustError::Fingerprint { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "`sha256:9f2c…` is not a certificate fingerprint: expected 64 hex digits after `sha256:`"
        );
        let e = "9f2c0a".parse::<Trust>().unwrap_err();
        assert_eq!(e, TrustError::Unrecognised { input: "9f2c0a".into() });
        assert!(e.to_string().starts_with("`9f2c0a` is neither a certificate fingerprint"), "{e}");
        assert!(e.to_string().ends_with("nor an existing CA file"), "{e}");
        assert_eq!("  ".parse::<Trust>(), Err(TrustError::Empty));
        // The error is a std error: `?` takes it into anyhow or a boxed error.
        let boxed: Box<dyn std::error::Error + Send + Sync> = e.into();
        assert!(!boxed.to_string().is_empty());
    }
}
