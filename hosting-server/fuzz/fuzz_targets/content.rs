//! Arbitrary text as a content file: `Content::parse` must never panic, and content it accepts
//! builds a world that ticks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_hosting::behaviour::BUILT_IN;
use shoal_hosting::content::{Content, MAX_ENTITIES};
use shoal_hosting::world::World;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(content) = Content::parse(text, BUILT_IN) else { return };
    assert!(content.entities() <= MAX_ENTITIES);
    // Keep each input quick: building a world of a million entities is not what is tested.
    if content.entities() > 2_000 {
        return;
    }
    let Ok(mut world) = World::new(content, 1, &[]) else { panic!("checked content did not build") };
    world.tick(0.05, &[]);
    while world.poll_event().is_some() {}
});
