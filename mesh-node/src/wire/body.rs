//! Kind-specific bodies: the bind handshake, subscribe answers and notices.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use shoal_protocol::identity::{NODE_ID_LEN, SIGNATURE_LEN};
use shoal_protocol::ticket::TICKET_LEN;
use shoal_protocol::{NodeId, Signature};

use super::{
    ADDR_LEN, BIND_PROOF_BODY_LEN, CHALLENGE_BODY_LEN, COOKIE_LEN, ParseError, SUBSCRIBE_ACK_BODY_LEN, u64_at,
};

/// Body of a [`Kind::BindChallenge`] (and the echo of it inside a proof).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// Relay's time when it made the cookie, in Unix seconds.
    pub issued_at: u64,
    /// MAC over the requester's address, id and `issued_at`, under the relay's secret.
    pub cookie: [u8; COOKIE_LEN],
}

impl Challenge {
    /// Writes the 24-byte body.
    pub fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.issued_at.to_be_bytes());
        out[8..CHALLENGE_BODY_LEN].copy_from_slice(&self.cookie);
    }

    /// Reads it from a body of at least [`CHALLENGE_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &[u8]) -> Challenge {
        let mut cookie = [0; COOKIE_LEN];
        cookie.copy_from_slice(&body[8..CHALLENGE_BODY_LEN]);
        Challenge { issued_at: u64_at(body, 0), cookie }
    }
}

/// Body of a [`Kind::BindProof`], borrowed.
#[derive(Debug, Clone, Copy)]
pub struct BindProof<'a> {
    /// The challenge being answered.
    pub challenge: Challenge,
    /// The node's relay permit, not yet decoded.
    pub permit: &'a [u8],
    /// The node's signature over [`bind_proof_message`].
    pub signature: Signature,
}

impl<'a> BindProof<'a> {
    /// Reads it from a body of at least [`BIND_PROOF_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &'a [u8]) -> BindProof<'a> {
        let permit_at = CHALLENGE_BODY_LEN;
        let sig_at = permit_at + TICKET_LEN;
        let mut sig = [0; SIGNATURE_LEN];
        sig.copy_from_slice(&body[sig_at..sig_at + SIGNATURE_LEN]);
        BindProof { challenge: Challenge::read(body), permit: &body[permit_at..sig_at], signature: Signature(sig) }
    }

    /// Writes the body.
    pub fn write(challenge: &Challenge, permit: &[u8; TICKET_LEN], signature: &Signature, out: &mut [u8]) {
        challenge.write(out);
        out[CHALLENGE_BODY_LEN..CHALLENGE_BODY_LEN + TICKET_LEN].copy_from_slice(permit);
        out[CHALLENGE_BODY_LEN + TICKET_LEN..BIND_PROOF_BODY_LEN].copy_from_slice(&signature.0);
    }
}

/// Domain separation for bind proofs.
pub const BIND_CONTEXT: &[u8] = b"shoal/bind/v1";

/// Domain separation for unbinds: a node's signature over the same message as its bind proof,
/// so a captured bind proof cannot be replayed as an unbind.
pub const UNBIND_CONTEXT: &[u8] = b"shoal/unbind/v1";

/// What a node signs to prove it holds its key: the relay's id and the challenge. Binding the
/// relay id stops one relay replaying a proof to another.
pub fn bind_proof_message(relay: NodeId, challenge: &Challenge) -> [u8; NODE_ID_LEN + CHALLENGE_BODY_LEN] {
    let mut m = [0; NODE_ID_LEN + CHALLENGE_BODY_LEN];
    m[..NODE_ID_LEN].copy_from_slice(&relay.0);
    challenge.write(&mut m[NODE_ID_LEN..]);
    m
}

/// Writes `addr` into the first [`ADDR_LEN`] bytes of `out`.
///
/// # Panics
/// If `out` is shorter than [`ADDR_LEN`]: a caller bug, as with a slice index.
pub fn write_addr(addr: SocketAddr, out: &mut [u8]) {
    let (family, ip) = match addr.ip() {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => (6, v6),
    };
    out[0] = family;
    out[1..3].copy_from_slice(&addr.port().to_be_bytes());
    out[3..ADDR_LEN].copy_from_slice(&ip.octets());
}

/// Reads an address written by [`write_addr`] from the first [`ADDR_LEN`] bytes of `b`.
pub fn read_addr(b: &[u8]) -> Result<SocketAddr, ParseError> {
    let b: &[u8; ADDR_LEN] = b
        .get(..ADDR_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or(ParseError::Truncated { needed: ADDR_LEN, got: b.len() })?;
    let mut ip = [0; 16];
    ip.copy_from_slice(&b[3..]);
    let ip = Ipv6Addr::from(ip);
    let ip = match b[0] {
        4 => IpAddr::V4(ip.to_ipv4_mapped().ok_or(ParseError::InvalidField("address: v4 address not mapped"))?),
        6 => IpAddr::V6(ip),
        _ => return Err(ParseError::InvalidField("address: family")),
    };
    Ok(SocketAddr::new(ip, u16::from_be_bytes([b[1], b[2]])))
}

/// Body of a [`Kind::BindAck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAck {
    /// Unix second at which the binding lapses (the permit's expiry, or sooner).
    pub expires_at: u64,
    /// The node's address as the relay saw it (server-reflexive).
    pub observed: SocketAddr,
}

impl BindAck {
    /// Writes the 27-byte body.
    pub fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.expires_at.to_be_bytes());
        write_addr(self.observed, &mut out[8..]);
    }

    /// Reads it from a body of at least [`BIND_ACK_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &[u8]) -> Result<BindAck, ParseError> {
        Ok(BindAck { expires_at: u64_at(body, 0), observed: read_addr(&body[8..])? })
    }
}

/// A relay's answer to a subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SubscribeStatus {
    /// The node is a member of the group until its subscription expires.
    Member = 0,
    /// The node left the group (the answer to a leave).
    Left = 1,
    /// The sender's address holds no binding of the node the subscription names.
    NotBound = 2,
    /// Made for another relay.
    WrongRelay = 3,
    /// Presented by a node other than its subscriber.
    WrongSubscriber = 4,
    /// Expired, or issued in the future.
    Expired = 5,
    /// Not the control server's signature, or an unknown layout.
    Forged = 6,
    /// The group holds as many members as the relay allows.
    GroupFull = 7,
    /// The relay holds as many groups as it allows.
    TooManyGroups = 8,
}

impl SubscribeStatus {
    /// Every status, in wire order.
    pub const ALL: [SubscribeStatus; 9] = [
        SubscribeStatus::Member,
        SubscribeStatus::Left,
        SubscribeStatus::NotBound,
        SubscribeStatus::WrongRelay,
        SubscribeStatus::WrongSubscriber,
        SubscribeStatus::Expired,
        SubscribeStatus::Forged,
        SubscribeStatus::GroupFull,
        SubscribeStatus::TooManyGroups,
    ];
}

/// The body of a [`Kind::SubscribeAck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeAck {
    /// Member, or why not.
    pub status: SubscribeStatus,
    /// The stream the subscribe named.
    pub stream: u16,
    /// Its publisher.
    pub publisher: NodeId,
}

impl SubscribeAck {
    /// Writes the body into `out` (at least [`SUBSCRIBE_ACK_BODY_LEN`] bytes).
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.status as u8;
        out[1] = 0;
        out[2..4].copy_from_slice(&self.stream.to_be_bytes());
        out[4..SUBSCRIBE_ACK_BODY_LEN].copy_from_slice(&self.publisher.0);
    }

    /// Reads a body the parser has sized.
    pub fn read(body: &[u8]) -> Result<SubscribeAck, ParseError> {
        let status = SubscribeStatus::ALL
            .into_iter()
            .find(|s| *s as u8 == body[0])
            .ok_or(ParseError::InvalidField("subscribe status"))?;
        let mut publisher = [0; NODE_ID_LEN];
        publisher.copy_from_slice(&body[4..SUBSCRIBE_ACK_BODY_LEN]);
        Ok(SubscribeAck { status, stream: u16::from_be_bytes([body[2], body[3]]), publisher: NodeId(publisher) })
    }
}

/// Why a relay refused a datagram, as told to the previous hop in a [`Kind::Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NoticeCode {
    /// The sender's address holds no binding: present a permit first.
    NotBound = 1,
    /// The sender's binding lapsed with its permit: bind again with a fresh permit.
    PermitExpired = 2,
    /// The relay does not know the next hop (the destination is not bound here, or the next
    /// relay is not a peer).
    UnknownNextHop = 3,
    /// The bind proof was refused; the detail byte says why (see [`BindRefusal`]).
    BindRefused = 4,
}

impl NoticeCode {
    fn from_u8(b: u8) -> Option<NoticeCode> {
        match b {
            1 => Some(NoticeCode::NotBound),
            2 => Some(NoticeCode::PermitExpired),
            3 => Some(NoticeCode::UnknownNextHop),
            4 => Some(NoticeCode::BindRefused),
            _ => None,
        }
    }
}

/// Detail of a [`NoticeCode::BindRefused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BindRefusal {
    /// The cookie does not match this address or has expired.
    BadCookie = 1,
    /// The permit does not decode.
    MalformedPermit = 2,
    /// The permit is not signed by the control key.
    ForgedPermit = 3,
    /// The permit has expired or is not yet valid.
    ExpiredPermit = 4,
    /// The permit is of the wrong kind or lacks a role.
    WrongRole = 5,
    /// The node's signature over the challenge does not match the permit's key.
    BadProof = 6,
    /// The permit names another node than the header's source.
    WrongNode = 7,
    /// The relay's binding table is full.
    Full = 8,
}

impl BindRefusal {
    /// Every refusal, in wire order.
    pub const ALL: [BindRefusal; 8] = [
        BindRefusal::BadCookie,
        BindRefusal::MalformedPermit,
        BindRefusal::ForgedPermit,
        BindRefusal::ExpiredPermit,
        BindRefusal::WrongRole,
        BindRefusal::BadProof,
        BindRefusal::WrongNode,
        BindRefusal::Full,
    ];

    fn from_u8(b: u8) -> Option<BindRefusal> {
        BindRefusal::ALL.into_iter().find(|r| *r as u8 == b)
    }
}

/// Body of a [`Kind::Notice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notice {
    /// Why.
    pub code: NoticeCode,
    /// Detail for [`NoticeCode::BindRefused`].
    pub refusal: Option<BindRefusal>,
}

impl Notice {
    /// Writes the 4-byte body.
    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.code as u8;
        out[1] = self.refusal.map_or(0, |r| r as u8);
        out[2..4].fill(0);
    }

    /// Reads it from a body of at least [`NOTICE_BODY_LEN`] bytes (checked by parse).
    pub fn read(body: &[u8]) -> Result<Notice, ParseError> {
        let code = NoticeCode::from_u8(body[0]).ok_or(ParseError::InvalidField("notice code"))?;
        let refusal = match (code, body[1]) {
            (NoticeCode::BindRefused, b) => Some(BindRefusal::from_u8(b).ok_or(ParseError::InvalidField("refusal"))?),
            (_, 0) => None,
            _ => return Err(ParseError::InvalidField("notice detail")),
        };
        Ok(Notice { code, refusal })
    }
}
