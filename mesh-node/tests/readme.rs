//! The README's relay config is one the relay reads: every field it shows exists, with the
//! type it shows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_mesh::config::RelayFile;

#[test]
fn the_readme_relay_toml_parses() {
    let readme = include_str!("../../README.md");
    let (_, after) = readme.split_once("`relay-data/relay.toml`").expect("the README shows relay.toml");
    let block = after.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).unwrap();
    let file: RelayFile = toml::from_str(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
    assert!(file.control.is_some(), "the README shows the [control] table");
}
