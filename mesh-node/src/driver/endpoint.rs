//! The endpoint on a real UDP socket: a single-owner async wrapper that drives the sans-IO
//! [`Endpoint`] while its owner awaits one of its calls. Events that arrive while waiting for
//! another kind are kept, in order, for the next call.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_protocol::{Identity, NodeId, SignedSubscription, SignedTicket};

use crate::clock::WallClock;
use crate::driver::batch::BUF_LEN;
use crate::endpoint::{Endpoint, EndpointEvent, Envelope, Path, ProbeReport, Received, SendError};
use crate::wire::{MAX_DATAGRAM, SubscribeAck};

/// Why an endpoint call failed.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The datagram could not be built or routed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// Nothing arrived in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The probe got no answer.
    #[error("probe {0} lost")]
    ProbeLost(u64),
}

/// An endpoint bound to a UDP socket.
#[derive(Debug)]
pub struct MeshEndpoint {
    sock: tokio::net::UdpSocket,
    core: Endpoint,
    pending: VecDeque<EndpointEvent>,
    buf: Vec<u8>,
}

impl MeshEndpoint {
    /// Binds a socket at `addr` for `identity`, which shows `permit` to relays.
    pub async fn bind(addr: SocketAddr, identity: Identity, permit: SignedTicket) -> io::Result<MeshEndpoint> {
        let sock = tokio::net::UdpSocket::bind(addr).await?;
        Ok(MeshEndpoint {
            sock,
            core: Endpoint::new(identity, permit, WallClock::system()),
            pending: VecDeque::new(),
            buf: vec![0; BUF_LEN],
        })
    }

    /// The socket's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Our node id.
    pub fn node_id(&self) -> NodeId {
        self.core.node_id()
    }

    /// The sans-IO core, for what this wrapper does not expose.
    pub fn core(&self) -> &Endpoint {
        &self.core
    }

    /// Binds to the relay at `addr` and waits until it accepts; returns its id.
    pub async fn attach_relay(&mut self, addr: SocketAddr, timeout: Duration) -> Result<NodeId, MeshError> {
        self.core.add_relay(Instant::now(), addr);
        self.flush().await?;
        self.wait_for(timeout, |e| match e {
            EndpointEvent::RelayBound { relay, addr: a, .. } if *a == addr => Some(*relay),
            _ => None,
        })
        .await
    }

    /// Sends `payload` as `env` says.
    pub async fn send(&mut self, env: &Envelope, payload: &[u8]) -> Result<(), MeshError> {
        let (to, len) = self.core.encode_data(Instant::now(), env, payload, &mut self.buf[..MAX_DATAGRAM])?;
        self.sock.send_to(&self.buf[..len], to).await?;
        Ok(())
    }

    /// Waits for the next payload.
    pub async fn recv(&mut self, timeout: Duration) -> Result<Received, MeshError> {
        self.wait_for(timeout, |e| match e {
            EndpointEvent::Received(r) => Some(r.clone()),
            _ => None,
        })
        .await
    }

    /// Presents `subscription` to the relay it names (to join its fan-out group, or with
    /// `leave` to leave it) and waits for the relay's answer.
    pub async fn subscribe(
        &mut self,
        subscription: &SignedSubscription,
        leave: bool,
        timeout: Duration,
    ) -> Result<SubscribeAck, MeshError> {
        let relay = subscription.body.relay;
        self.core.subscribe(Instant::now(), subscription, leave)?;
        self.flush().await?;
        self.wait_for(timeout, |e| match e {
            EndpointEvent::Subscription { relay: r, ack } if *r == relay => Some(*ack),
            _ => None,
        })
        .await
    }

    /// Publishes `payload` on our `stream` through `relay`, which copies it to the group's
    /// members.
    pub async fn publish(&mut self, relay: NodeId, stream: u16, payload: &[u8]) -> Result<(), MeshError> {
        self.core.publish(Instant::now(), relay, stream, false, payload)?;
        self.flush().await?;
        Ok(())
    }

    /// Waits for the next copy from a fan-out group we are a member of.
    pub async fn recv_published(&mut self, timeout: Duration) -> Result<Received, MeshError> {
        self.wait_for(timeout, |e| match e {
            EndpointEvent::Published(r) => Some(r.clone()),
            _ => None,
        })
        .await
    }

    /// Probes `path` to `destination` and waits for the report.
    pub async fn probe(&mut self, destination: NodeId, path: &Path) -> Result<ProbeReport, MeshError> {
        let id = self.core.probe(Instant::now(), destination, path)?;
        self.flush().await?;
        self.wait_for(crate::endpoint::PROBE_TIMEOUT + Duration::from_secs(1), |e| match e {
            EndpointEvent::ProbeDone(r) if r.id == id => Some(Ok(r.clone())),
            EndpointEvent::ProbeLost { id: lost } if *lost == id => Some(Err(MeshError::ProbeLost(id))),
            _ => None,
        })
        .await?
    }

    /// Waits for the next event of any kind.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<EndpointEvent, MeshError> {
        self.wait_for(timeout, |e| Some(e.clone())).await
    }

    /// Drives the endpoint until `pick` accepts an event (kept events first), or `timeout`.
    async fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&EndpointEvent) -> Option<T>,
    ) -> Result<T, MeshError> {
        let deadline = Instant::now() + timeout;
        let mut scanned = 0;
        loop {
            while scanned < self.pending.len() {
                if let Some(found) = pick(&self.pending[scanned]) {
                    self.pending.remove(scanned);
                    return Ok(found);
                }
                scanned += 1;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MeshError::Timeout(timeout));
            }
            let wake = self.core.poll_timeout().unwrap_or(deadline).min(deadline);
            tokio::select! {
                r = self.sock.recv_from(&mut self.buf) => {
                    let (n, from) = r?;
                    self.core.handle_datagram(Instant::now(), from, &self.buf[..n]);
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    self.core.handle_timeout(Instant::now());
                }
            }
            self.flush().await?;
            while let Some(e) = self.core.poll_event() {
                self.pending.push_back(e);
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        while let Some(t) = self.core.poll_transmit() {
            self.sock.send_to(&t.bytes, t.to).await?;
        }
        Ok(())
    }
}
