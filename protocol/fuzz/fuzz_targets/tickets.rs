//! Arbitrary bytes as a session ticket or relay permit (as given, and with the node id made
//! to match the key). Whatever decodes re-encodes to the
//! bytes it came from, and verifying it (as a session ticket and as a permit, against a fixed
//! control key, at times before, inside and after its window) only ever returns a value.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shoal_protocol::ticket::TICKET_LEN;
use shoal_protocol::{Identity, PublicKey, Roles, SignedTicket, TicketKind, UnixTime};

fn control() -> PublicKey {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    *KEY.get_or_init(|| Identity::from_seed([7; 32]).public_key())
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // Most inputs name a node id that is not their key's: also try each with its id repaired,
    // so that the checks past that one see fuzzed input too.
    if data.len() >= TICKET_LEN {
        let mut fixed = data.to_vec();
        let key: [u8; 32] = fixed[12..44].try_into().unwrap_or([0; 32]);
        fixed[4..12].copy_from_slice(&PublicKey(key).node_id().0);
        check(&fixed);
    }
});

fn check(data: &[u8]) {
    let t = match SignedTicket::decode(data) {
        Ok(t) => t,
        Err(e) => {
            let _ = e.to_string();
            assert!(data.len() >= TICKET_LEN || matches!(e, shoal_protocol::TicketError::Truncated { .. }));
            return;
        }
    };
    assert_eq!(t.encode()[..], data[..TICKET_LEN]);
    assert_eq!(t.body.public_key.node_id(), t.body.node_id);
    let b = t.body;
    for now in [UnixTime(0), b.issued_at, UnixTime(b.expires_at.0.saturating_sub(1)), b.expires_at, UnixTime(u64::MAX)] {
        for kind in [TicketKind::Session, TicketKind::RelayPermit] {
            for roles in [Roles::CLIENT, Roles::RELAY, Roles::KNOWN] {
                // A fuzzed signature by the fixed control key is out of reach: never valid.
                if let Err(e) = t.verify(&control(), kind, roles, now) {
                    let _ = e.to_string();
                } else {
                    panic!("a fuzzed ticket verified");
                }
            }
        }
    }
}
