//! A relay's registration with the control server: it announces itself over QUIC (ALPN
//! `shoal-relay/1`) with a proof of its key, receives its permit and the other relays, binds
//! to them, and reports its round-trip times to them every [`REPORT_EVERY`]. A lost
//! connection is retried with exponential backoff; forwarding never waits for any of it.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_link::{ControlLink, LinkError, Trust, write_message};
use shoal_protocol::control::{ControlToRelay, KeyProof, RELAY_ACCOUNT, RelayToControl};
use shoal_protocol::{Identity, SignedSubscription, SignedTicket};
use tokio::sync::{mpsc, watch};

use crate::driver::relay::RelayHandle;

/// How often the relay reports its peers' round-trip times (and so keeps its presence).
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Where and as whom to register.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The control server.
    pub control: SocketAddr,
    /// How its certificate is trusted.
    pub trust: Trust,
    /// The relay's identity.
    pub identity: Identity,
    /// Where clients reach the relay.
    pub public_addr: SocketAddr,
}

/// Why one registration session ended.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("refused: {0}")]
    Refused(shoal_protocol::control::Refusal),
    #[error("unreadable permit")]
    BadPermit,
}

/// Registers and stays registered until `stop` turns true.
pub async fn run(reg: Registration, relay: RelayHandle, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let session = tokio::select! {
            r = session(&reg, &relay, &mut backoff) => r,
            _ = stop.changed() => return,
        };
        if let Err(e) = session {
            tracing::warn!(control = %reg.control, "control server registration: {e}; retrying in {backoff:?}");
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: register, then apply what the server sends and report RTTs.
async fn session(reg: &Registration, relay: &RelayHandle, backoff: &mut Duration) -> Result<(), SessionEnd> {
    let link = ControlLink::connect_relay(reg.control, &reg.trust).await?;
    let server = link.server_fingerprint().ok_or(LinkError::Connect("no server certificate".into()))?;
    let ControlLink { endpoint: _endpoint, connection, mut send, mut recv } = link;
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let proof = KeyProof::new(&reg.identity, RELAY_ACCOUNT, unix_ms, &server);
    write_message(&mut send, &RelayToControl::Register { addr: reg.public_addr, proof }).await?;
    // Reads go through a task: a read cut short by the report timer would lose its frame.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        loop {
            let m = recv.read_message::<ControlToRelay>().await;
            let end = m.is_err();
            if tx.send(m).is_err() || end {
                return;
            }
        }
    });
    let result = async {
        let mut report = tokio::time::interval(REPORT_EVERY);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Ok(ControlToRelay::Registered { permit, peers })) => {
                        let permit = SignedTicket::decode(&permit).map_err(|_| SessionEnd::BadPermit)?;
                        relay.set_permit(permit);
                        for p in &peers {
                            relay.add_peer(p.addr);
                        }
                        *backoff = BACKOFF_MIN;
                        tracing::info!(control = %reg.control, peers = peers.len(), "registered with the control server");
                    }
                    Some(Ok(ControlToRelay::Feed { subscription })) => match SignedSubscription::decode(&subscription) {
                        Ok(s) => relay.feed(s),
                        Err(e) => tracing::warn!(control = %reg.control, "unreadable feed: {e}"),
                    },
                    Some(Ok(ControlToRelay::Refused(r))) => return Err(SessionEnd::Refused(r)),
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(LinkError::Closed("reader stopped".into()).into()),
                },
                _ = report.tick() => {
                    let rtts: Vec<_> = relay
                        .peer_rtts()
                        .into_iter()
                        .map(|(id, _, rtt)| (id, rtt.as_micros().min(u128::from(u32::MAX)) as u32))
                        .collect();
                    let msg = if rtts.is_empty() { RelayToControl::Keepalive } else { RelayToControl::PeerRtts(rtts) };
                    write_message(&mut send, &msg).await?;
                }
            }
        }
    }
    .await;
    reader.abort();
    connection.close(0u32.into(), b"relay leaving");
    result
}
