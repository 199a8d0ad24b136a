//! Arbitrary bytes as one codec frame of every control-plane message type. Whatever decodes
//! must encode again, and that encoding must decode to a message that encodes to the same
//! bytes (NaN positions rule out comparing the messages themselves). Profiles carried in an
//! introduction, and tickets carried in a welcome, a permit or a registration, are untrusted
//! bytes too and are read.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_protocol::SignedTicket;
use shoal_protocol::codec::{decode, encode};
use shoal_protocol::control::{ClientToControl, ControlToClient, ControlToRelay, MAX_CONTROL_FRAME, RelayToControl};
use shoal_protocol::profile::ProfileConfig;

fuzz_target!(|data: &[u8]| {
    check::<ClientToControl>(data);
    if let Some(m) = check::<ControlToClient>(data) {
        match m {
            ControlToClient::Welcome { session, permit, .. } => {
                ticket(&session);
                ticket(&permit);
            }
            ControlToClient::Permit(p) => ticket(&p),
            ControlToClient::Introduce(intro) => {
                for (_, wire) in &intro.profiles {
                    if let Ok(p) = ProfileConfig::from_wire(wire) {
                        let _ = p.check();
                    }
                }
            }
            ControlToClient::Refused(r) => assert!(!r.to_string().is_empty()),
            _ => {}
        }
    }
    check::<RelayToControl>(data);
    if let Some(ControlToRelay::Registered { permit, .. }) = check::<ControlToRelay>(data) {
        ticket(&permit);
    }
});

fn check<T: Serialize + DeserializeOwned>(data: &[u8]) -> Option<T> {
    let m = match decode::<T>(data, MAX_CONTROL_FRAME) {
        Ok(m) => m,
        Err(e) => {
            let _ = e.to_string();
            return None;
        }
    };
    let again = match encode(&m) {
        Ok(f) => f,
        Err(e) => panic!("a decoded message does not encode: {e}"),
    };
    assert!(again.len() <= data.len(), "re-encoding grew from {} to {} bytes", data.len(), again.len());
    let m2: T = match decode(&again, MAX_CONTROL_FRAME) {
        Ok(m2) => m2,
        Err(e) => panic!("a re-encoded message does not decode: {e}"),
    };
    assert_eq!(encode(&m2).ok(), Some(again));
    Some(m)
}

fn ticket(bytes: &[u8]) {
    if let Ok(t) = SignedTicket::decode(bytes) {
        assert_eq!(t.encode()[..], bytes[..t.encode().len()]);
    }
}
