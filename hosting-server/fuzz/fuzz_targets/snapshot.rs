//! Arbitrary bytes as a snapshot: `snapshot::decode` must never panic, and what it accepts the
//! reader applies without panicking, whatever baselines the entries name; a snapshot the
//! writer makes of the decoded states decodes to the same states.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_hosting::snapshot::{SnapshotReader, SnapshotWriter, decode};

fuzz_target!(|data: &[u8]| {
    let Ok((seq, entries)) = decode(data) else { return };
    let mut reader = SnapshotReader::new();
    // Twice: the second time the first's states are there as baselines.
    let _ = reader.apply(seq.wrapping_sub(1), &entries);
    let states = reader.apply(seq, &entries);
    let mut out = Vec::new();
    let again = SnapshotWriter::new().write(&states, &mut out);
    let Ok((s, decoded)) = decode(&out) else { panic!("a written snapshot does not decode") };
    assert_eq!(s, again);
    let applied = SnapshotReader::new().apply(s, &decoded);
    assert_eq!(applied, states);
});
