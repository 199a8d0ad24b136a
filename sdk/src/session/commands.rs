//! What a [`SessionCore`](super::SessionCore) asks of the mesh node, and what the node answers.
//!
//! The core holds no node: it emits [`NodeCommand`]s, the driver applies them in order to its
//! node ([`NodeCommand::apply`] on a sans-IO [`Node`], as the simulator does, or through the
//! tokio driver's [`NodeHandle::apply`](crate::NodeHandle::apply), which runs the same code in
//! the node's task), and feeds every [`NodeOutcome`] back with
//! [`SessionCore::handle_node_outcome`](super::SessionCore::handle_node_outcome).

use std::net::SocketAddr;
use std::time::Instant;

use renet::Bytes;
use shoal_mesh::bind::Transmit;
use shoal_mesh::wire::VcId;
use shoal_protocol::{NodeId, SignedSubscription, SignedTicket};

use crate::driver::NodeStatus;
use crate::node::{Node, NodeError, PeerInfo, VcKey};
use crate::profile::Profile;

/// Something the session needs the node to do.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeCommand {
    /// Show relays this permit from now on (the first one starts the node: the tokio driver
    /// creates it with the welcome's permit).
    SetPermit(SignedTicket),
    /// Bind to the relay at this address (the node ignores relays it already has).
    AddRelay(SocketAddr),
    /// An introduced neighbour: add it with these candidate paths, best first, and open these
    /// VCs with it. Answered with [`NodeOutcome::Introduced`].
    Introduce {
        /// The neighbour's key and paths.
        peer: PeerInfo,
        /// The VCs to open.
        vcs: Vec<(VcId, Profile)>,
    },
    /// A neighbour's farewell: forget it and close its VCs. Answered with
    /// [`NodeOutcome::Removed`].
    RemovePeer(NodeId),
    /// The node's state for a report. Answered with [`NodeOutcome::Status`].
    Status,
    /// The session signs out: tell the relays to let go of our bindings. Answered with
    /// [`NodeOutcome::Unbind`].
    UnbindRelays,
    /// Send these messages, each on its VC (the avatar mesh's updates and acks). Answered
    /// with [`NodeOutcome::Sent`].
    Send(Vec<(VcKey, Bytes)>),
    /// Present this subscription to the relay it names, to receive a watched player's stream
    /// (presented again when that relay binds us, if it had not yet).
    Subscribe(SignedSubscription),
    /// Leave the group this subscription joined.
    Unsubscribe(SignedSubscription),
    /// Publish our stream's next update through `relay`.
    Publish {
        /// The relay.
        relay: NodeId,
        /// Our stream.
        stream: u16,
        /// The sealed update.
        payload: Vec<u8>,
    },
}

/// What the node answers to a [`NodeCommand`] that asks for an answer.
#[derive(Debug, Clone)]
pub enum NodeOutcome {
    /// The neighbour was added and these VCs opened (or were open already).
    Introduced {
        /// The neighbour.
        peer: NodeId,
        /// The VCs open with it.
        vcs: Vec<VcKey>,
    },
    /// The neighbour was forgotten and these VCs closed.
    Removed {
        /// The former neighbour.
        peer: NodeId,
        /// The VCs closed.
        closed: Vec<VcKey>,
    },
    /// The node's state.
    Status(Box<NodeStatus>),
    /// Unbind datagrams for the relays, to send at once (the tokio driver has sent them).
    Unbind(Vec<Transmit>),
    /// Of the messages a [`NodeCommand::Send`] asked for, how many the node refused (their VC
    /// closed, or its queue full).
    Sent {
        /// Refused messages.
        refused: u64,
        /// Per peer sent to, the bytes of headers a datagram on that VC's path carries above
        /// UDP besides the message ([`Node::header_bytes`]), for the upload budget.
        headers: Vec<(NodeId, usize)>,
        /// Everything the node has sent so far, on the wire: UDP payload and 28 bytes of
        /// IPv4/UDP headers per datagram.
        upload: u64,
    },
}

impl NodeCommand {
    /// Applies the command to `node` at `now`. After it, drain the node's transmits and
    /// events, as after any call into a node; feed the outcome, if any, back to the session.
    pub fn apply(self, node: &mut Node, now: Instant) -> Option<NodeOutcome> {
        match self {
            NodeCommand::SetPermit(p) => {
                node.set_permit(now, p);
                None
            }
            NodeCommand::AddRelay(addr) => {
                node.add_relay(now, addr);
                None
            }
            NodeCommand::Introduce { peer, vcs } => {
                let id = peer.key.node_id();
                node.add_peer(now, peer);
                let mut opened = Vec::with_capacity(vcs.len());
                for (vc, profile) in vcs {
                    // Both sides open; whichever hello lands first opens the other side's VC.
                    match node.open(now, id, vc, profile) {
                        Ok(key) | Err(NodeError::Exists(key)) => opened.push(key),
                        Err(e) => tracing::warn!("opening VC {vc:?} with {id}: {e}"),
                    }
                }
                Some(NodeOutcome::Introduced { peer: id, vcs: opened })
            }
            NodeCommand::RemovePeer(peer) => Some(NodeOutcome::Removed { peer, closed: node.remove_peer(now, peer) }),
            NodeCommand::Status => Some(NodeOutcome::Status(Box::new(NodeStatus::of(node, now)))),
            NodeCommand::UnbindRelays => Some(NodeOutcome::Unbind(node.endpoint().unbind_all())),
            NodeCommand::Subscribe(sub) => {
                // Not bound to that relay yet: the session presents it again once it is.
                if let Err(e) = node.subscribe(now, &sub, false) {
                    tracing::debug!("subscription to {} not presented yet: {e}", sub.body.publisher);
                }
                None
            }
            NodeCommand::Unsubscribe(sub) => {
                if let Err(e) = node.subscribe(now, &sub, true) {
                    tracing::debug!("leave of {} not sent: {e}", sub.body.publisher);
                }
                None
            }
            NodeCommand::Publish { relay, stream, payload } => {
                if let Err(e) = node.publish(now, relay, stream, &payload) {
                    tracing::debug!("publish through {relay} failed: {e}");
                }
                None
            }
            NodeCommand::Send(messages) => {
                let mut refused = 0;
                let mut headers = Vec::with_capacity(messages.len());
                for (key, m) in messages {
                    refused += u64::from(node.send(key, m).is_err());
                    headers.extend(node.header_bytes(key).map(|h| (key.peer, h)));
                }
                Some(NodeOutcome::Sent { refused, headers, upload: node.traffic().0.on_the_wire() })
            }
        }
    }
}
