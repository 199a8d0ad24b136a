//! Arbitrary bytes as what a welcomed client sends: frames decoded as `ClientToHost` (as the
//! driver decodes them) and datagrams, fed to the hosting core between ticks. Never a panic;
//! every action that reaches a welcomed client's core gets exactly one answer; nothing but a
//! hello's checks welcomes anyone.

#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shoal_hosting::behaviour::BUILT_IN;
use shoal_hosting::content::Content;
use shoal_hosting::host::{ClientId, Host, HostConfig, Output};
use shoal_hosting::world::World;
use shoal_protocol::codec::decode;
use shoal_protocol::control::KeyProof;
use shoal_protocol::world::{ClientToHost, HostToClient, MAX_WORLD_FRAME, WORLD_ACCOUNT};
use shoal_protocol::{Identity, Roles, TicketBody, TicketKind, UnixTime};

const CONTENT: &str = "[[zone]]\nname = \"f\"\nmin = [0.0, 0.0]\nmax = [100.0, 100.0]\n\n\
    [[npc_kind]]\nname = \"s\"\nbehaviour = \"wander\"\nspeed = 1.0\nhealth = 20\nrespawn_secs = 1\n\n\
    [[spawn]]\nkind = \"s\"\nzone = \"f\"\ncount = 5\naround = [10.0, 10.0]\nradius = 3.0\n\n\
    [[object_kind]]\nname = \"g\"\nstates = [\"a\", \"b\"]\n\n[[object_kind]]\nname = \"h\"\nstates = [\"x\"]\nrespawn_secs = 2\n\n\
    [[object]]\nkind = \"g\"\nat = [10.0, 11.0]\n\n[[object]]\nkind = \"h\"\nat = [11.0, 10.0]\n";
const T0_MS: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let control = Identity::from_seed([1; 32]);
    let me = Identity::from_seed([2; 32]);
    let world = World::new(Content::parse(CONTENT, BUILT_IN).unwrap(), 1, &[]).unwrap();
    let mut host = Host::new(world, HostConfig::default(), control.public_key(), [7; 32]);
    let t0 = Instant::now();
    let session = TicketBody::new(TicketKind::Session, me.public_key(), Roles::CLIENT, UnixTime(T0_MS / 1000), 60)
        .sign(&control)
        .encode()
        .to_vec();
    // Client 1 says a good hello; client 2 says whatever the input says from the start.
    host.connected(ClientId(1));
    host.connected(ClientId(2));
    let hello = ClientToHost::Hello { session, proof: KeyProof::new(&me, WORLD_ACCOUNT, T0_MS, &[7; 32]) };
    host.on_message(t0, T0_MS, ClientId(1), hello);
    let mut acts = [0u64; 3];
    let mut answers = [0u64; 3];
    let mut closed = [false; 3];
    let mut ms = 0u64;
    // Chunks: a length byte, a kind byte (0: frame for client 1, 1: for client 2, 2: datagram,
    // 3: tick), then the bytes.
    let mut rest = data;
    while let [len, kind, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, more) = tail.split_at(n);
        rest = more;
        ms += 20;
        let now = t0 + Duration::from_millis(ms);
        match kind % 4 {
            c @ (0 | 1) => {
                let id = ClientId(u64::from(c) + 1);
                match decode::<ClientToHost>(chunk, MAX_WORLD_FRAME) {
                    Ok(m) => {
                        if matches!(m, ClientToHost::Act { .. }) && !closed[id.0 as usize] {
                            acts[id.0 as usize] += 1;
                        }
                        host.on_message(now, T0_MS + ms, id, m);
                    }
                    Err(_) => host.on_malformed(id),
                }
            }
            2 => host.on_datagram(ClientId(1), chunk),
            _ => host.tick(now),
        }
        while let Some(o) = host.poll_output() {
            match o {
                Output::Message(id, HostToClient::Done { .. } | HostToClient::Refused { .. }) => {
                    answers[id.0 as usize] += 1;
                }
                Output::Message(id, HostToClient::Welcome { .. }) => assert_eq!(id, ClientId(1), "welcomed without a good hello"),
                Output::Close(id) => closed[id.0 as usize] = true,
                _ => {}
            }
        }
    }
    // A client not closed answered every action; client 2 never said a good hello, so none.
    if !closed[1] {
        assert_eq!(acts[1], answers[1]);
    }
    assert_eq!(answers[2], 0);
});
