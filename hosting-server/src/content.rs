//! The world's content, as a studio writes it: a TOML file of zones, NPC kinds and where they
//! spawn, and object kinds and where they stand. [`Content::parse`] checks it once, whole, and
//! names the line and the field of anything wrong; the world is built only from content that
//! passed.
//!
//! ```toml
//! [[zone]]
//! name = "meadow"
//! min = [0.0, 0.0]          # x, z
//! max = [400.0, 400.0]
//!
//! [[npc_kind]]
//! name = "deer"
//! behaviour = "flee"        # wander, patrol, follow or flee (or one the studio registered)
//! speed = 4.0               # m/s
//! range = 25.0              # follow and flee: how near a player must come
//! health = 30
//! respawn_secs = 20
//!
//! [[spawn]]
//! kind = "deer"
//! zone = "meadow"
//! count = 40
//! around = [200.0, 200.0]
//! radius = 60.0
//! # route = [[10.0, 10.0], [60.0, 10.0]]   # patrols walk it, in a loop
//!
//! [[object_kind]]
//! name = "gate"
//! states = ["closed", "open"]
//!
//! [[object_kind]]
//! name = "herb"
//! states = ["ripe"]
//! respawn_secs = 30         # an item: picked up, it grows again after this long
//!
//! [[object]]
//! kind = "gate"
//! at = [120.0, 80.0]
//! ```

use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

/// Most entities a content file may spawn.
pub const MAX_ENTITIES: usize = 1 << 20;
/// Most states an object kind may have.
pub const MAX_STATES: usize = 256;

/// Content that cannot be loaded: where, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {field}: {reason}")]
pub struct ContentError {
    /// 1-based line of the offending value.
    pub line: usize,
    /// The field, as a path (`spawn[2].kind`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A zone: a rectangle of the world's ground plane, x and z, in metres.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    /// Its name.
    pub name: String,
    /// The corner with the smaller x and z.
    pub min: [f32; 2],
    /// The corner with the larger x and z.
    pub max: [f32; 2],
}

impl Zone {
    /// Whether `p` (x, z) lies inside.
    pub fn contains(&self, p: [f32; 2]) -> bool {
        (0..2).all(|i| p[i] >= self.min[i] && p[i] <= self.max[i])
    }
}

/// A kind of NPC.
#[derive(Debug, Clone, PartialEq)]
pub struct NpcKind {
    /// Its name.
    pub name: String,
    /// The behaviour its NPCs run, by name.
    pub behaviour: String,
    /// Walking speed, m/s.
    pub speed: f32,
    /// How near a player must come for it to react (follow, flee), m.
    pub range: f32,
    /// Health when it spawns.
    pub health: u16,
    /// How long after it dies it spawns again, s.
    pub respawn_secs: f32,
}

/// NPCs of one kind spawned in one place.
#[derive(Debug, Clone, PartialEq)]
pub struct Spawn {
    /// Index into [`Content::npc_kinds`].
    pub kind: usize,
    /// Index into [`Content::zones`].
    pub zone: usize,
    /// How many.
    pub count: usize,
    /// The centre of the circle they spawn (and wander) in, x and z.
    pub around: [f32; 2],
    /// Its radius, m.
    pub radius: f32,
    /// The route a patrol walks, in a loop (empty for other behaviours).
    pub route: Vec<[f32; 2]>,
}

/// A kind of object: the states it moves through as players use it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectKind {
    /// Its name.
    pub name: String,
    /// Its states, in order; it starts in the first.
    pub states: Vec<String>,
    /// For an item (a kind players pick up rather than use), how long it is gone once taken,
    /// seconds; `None` for an object that stays.
    pub respawn_secs: Option<f32>,
}

/// One object placed in the world.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Index into [`Content::object_kinds`].
    pub kind: usize,
    /// Where it stands, x and z.
    pub at: [f32; 2],
}

/// Checked content. See the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    /// The zones.
    pub zones: Vec<Zone>,
    /// The NPC kinds.
    pub npc_kinds: Vec<NpcKind>,
    /// Where NPCs spawn.
    pub spawns: Vec<Spawn>,
    /// The object kinds.
    pub object_kinds: Vec<ObjectKind>,
    /// The objects.
    pub objects: Vec<Object>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContent {
    #[serde(default)]
    zone: Vec<RawZone>,
    #[serde(default)]
    npc_kind: Vec<RawNpcKind>,
    #[serde(default)]
    spawn: Vec<RawSpawn>,
    #[serde(default)]
    object_kind: Vec<RawObjectKind>,
    #[serde(default)]
    object: Vec<RawObject>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    name: Spanned<String>,
    min: Spanned<[f32; 2]>,
    max: Spanned<[f32; 2]>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNpcKind {
    name: Spanned<String>,
    behaviour: Spanned<String>,
    speed: Spanned<f32>,
    #[serde(default)]
    range: Option<Spanned<f32>>,
    health: Spanned<u16>,
    respawn_secs: Spanned<f32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpawn {
    kind: Spanned<String>,
    zone: Spanned<String>,
    count: Spanned<usize>,
    around: Spanned<[f32; 2]>,
    radius: Spanned<f32>,
    #[serde(default)]
    route: Option<Spanned<Vec<[f32; 2]>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjectKind {
    name: Spanned<String>,
    states: Spanned<Vec<String>>,
    #[serde(default)]
    respawn_secs: Option<Spanned<f32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObject {
    kind: Spanned<String>,
    at: Spanned<[f32; 2]>,
}

/// Turns byte offsets into line numbers and builds errors.
struct Lines<'a> {
    text: &'a str,
}

impl Lines<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        let at = span.start.min(self.text.len());
        self.text.as_bytes()[..at].iter().filter(|b| **b == b'\n').count() + 1
    }

    /// The key written on `line` (`health` of `health = 7`), or the line itself (a table
    /// header): what a syntax or type error is about.
    fn key_at(&self, line: usize) -> String {
        let text = self.text.lines().nth(line.saturating_sub(1)).unwrap_or("");
        text.split('=').next().unwrap_or("").trim().to_string()
    }

    fn err<T>(&self, span: Range<usize>, field: String, reason: impl Into<String>) -> Result<T, ContentError> {
        Err(ContentError { line: self.line(span), field, reason: reason.into() })
    }
}

fn finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

impl Content {
    /// Parses and checks `text`. `behaviours` are the behaviour names the world knows (the
    /// built-in ones and any the studio registered).
    ///
    /// # Errors
    /// The first thing wrong, with its line and field.
    pub fn parse(text: &str, behaviours: &[&str]) -> Result<Content, ContentError> {
        let l = Lines { text };
        let raw: RawContent = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| l.line(s));
            ContentError { line, field: l.key_at(line), reason: e.message().to_string() }
        })?;
        let mut c = Content {
            zones: Vec::new(),
            npc_kinds: Vec::new(),
            spawns: Vec::new(),
            object_kinds: Vec::new(),
            objects: Vec::new(),
        };
        for (i, z) in raw.zone.iter().enumerate() {
            let (min, max) = (*z.min.get_ref(), *z.max.get_ref());
            if !finite(&min) || !finite(&max) || min[0] >= max[0] || min[1] >= max[1] {
                return l.err(z.max.span(), format!("zone[{i}].max"), "must be finite and beyond min in x and z");
            }
            if c.zones.iter().any(|o: &Zone| o.name == *z.name.get_ref()) {
                return l.err(z.name.span(), format!("zone[{i}].name"), "a zone of that name comes earlier");
            }
            c.zones.push(Zone { name: z.name.get_ref().clone(), min, max });
        }
        if c.zones.is_empty() {
            return l.err(0..0, "zone".into(), "the content needs at least one zone");
        }
        for (i, k) in raw.npc_kind.iter().enumerate() {
            let field = |f: &str| format!("npc_kind[{i}].{f}");
            if !behaviours.contains(&k.behaviour.get_ref().as_str()) {
                let known = behaviours.join(", ");
                return l.err(k.behaviour.span(), field("behaviour"), format!("unknown; one of {known}"));
            }
            let speed = *k.speed.get_ref();
            if !speed.is_finite() || !(0.0..=100.0).contains(&speed) {
                return l.err(k.speed.span(), field("speed"), "must be between 0 and 100 m/s");
            }
            let range = k.range.as_ref().map_or(0.0, |r| *r.get_ref());
            if !range.is_finite() || range < 0.0 {
                let span = k.range.as_ref().map_or(k.name.span(), Spanned::span);
                return l.err(span, field("range"), "must be 0 or more");
            }
            let respawn = *k.respawn_secs.get_ref();
            if !respawn.is_finite() || respawn < 0.0 {
                return l.err(k.respawn_secs.span(), field("respawn_secs"), "must be 0 or more");
            }
            if c.npc_kinds.iter().any(|o: &NpcKind| o.name == *k.name.get_ref()) {
                return l.err(k.name.span(), field("name"), "an NPC kind of that name comes earlier");
            }
            c.npc_kinds.push(NpcKind {
                name: k.name.get_ref().clone(),
                behaviour: k.behaviour.get_ref().clone(),
                speed,
                range,
                health: *k.health.get_ref(),
                respawn_secs: respawn,
            });
        }
        let mut total = 0usize;
        for (i, s) in raw.spawn.iter().enumerate() {
            let field = |f: &str| format!("spawn[{i}].{f}");
            let Some(kind) = c.npc_kinds.iter().position(|k| k.name == *s.kind.get_ref()) else {
                return l.err(s.kind.span(), field("kind"), format!("no NPC kind {:?}", s.kind.get_ref()));
            };
            let Some(zone) = c.zones.iter().position(|z| z.name == *s.zone.get_ref()) else {
                return l.err(s.zone.span(), field("zone"), format!("no zone {:?}", s.zone.get_ref()));
            };
            let around = *s.around.get_ref();
            if !finite(&around) || !c.zones[zone].contains(around) {
                return l.err(s.around.span(), field("around"), "must lie inside the zone");
            }
            let radius = *s.radius.get_ref();
            if !radius.is_finite() || radius < 0.0 {
                return l.err(s.radius.span(), field("radius"), "must be 0 or more");
            }
            let route = s.route.as_ref().map(|r| r.get_ref().clone()).unwrap_or_default();
            if let Some(r) = &s.route
                && (route.len() < 2 || !route.iter().all(|p| finite(p) && c.zones[zone].contains(*p)))
            {
                return l.err(r.span(), field("route"), "needs two points or more, all inside the zone");
            }
            if c.npc_kinds[kind].behaviour == "patrol" && route.is_empty() {
                return l.err(s.kind.span(), field("route"), "a patrol needs a route");
            }
            total = total.saturating_add(*s.count.get_ref());
            if total > MAX_ENTITIES {
                return l.err(s.count.span(), field("count"), format!("more than {MAX_ENTITIES} entities in all"));
            }
            c.spawns.push(Spawn { kind, zone, count: *s.count.get_ref(), around, radius, route });
        }
        for (i, k) in raw.object_kind.iter().enumerate() {
            let states = k.states.get_ref();
            if states.is_empty() || states.len() > MAX_STATES {
                let reason = format!("needs between 1 and {MAX_STATES} states");
                return l.err(k.states.span(), format!("object_kind[{i}].states"), reason);
            }
            if c.object_kinds.iter().any(|o: &ObjectKind| o.name == *k.name.get_ref()) {
                let reason = "an object kind of that name comes earlier";
                return l.err(k.name.span(), format!("object_kind[{i}].name"), reason);
            }
            if let Some(r) = &k.respawn_secs
                && !(r.get_ref().is_finite() && *r.get_ref() > 0.0)
            {
                return l.err(r.span(), format!("object_kind[{i}].respawn_secs"), "must be above zero");
            }
            let respawn_secs = k.respawn_secs.as_ref().map(|r| *r.get_ref());
            c.object_kinds.push(ObjectKind { name: k.name.get_ref().clone(), states: states.clone(), respawn_secs });
        }
        for (i, o) in raw.object.iter().enumerate() {
            let Some(kind) = c.object_kinds.iter().position(|k| k.name == *o.kind.get_ref()) else {
                let reason = format!("no object kind {:?}", o.kind.get_ref());
                return l.err(o.kind.span(), format!("object[{i}].kind"), reason);
            };
            let at = *o.at.get_ref();
            if !finite(&at) || !c.zones.iter().any(|z| z.contains(at)) {
                return l.err(o.at.span(), format!("object[{i}].at"), "must lie inside a zone");
            }
            total += 1;
            if total > MAX_ENTITIES {
                return l.err(o.at.span(), format!("object[{i}]"), format!("more than {MAX_ENTITIES} entities in all"));
            }
            c.objects.push(Object { kind, at });
        }
        Ok(c)
    }

    /// How many entities the content spawns.
    pub fn entities(&self) -> usize {
        self.spawns.iter().map(|s| s.count).sum::<usize>() + self.objects.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::behaviour::BUILT_IN;

    const GOOD: &str = r#"
[[zone]]
name = "meadow"
min = [0.0, 0.0]
max = [400.0, 400.0]

[[npc_kind]]
name = "deer"
behaviour = "flee"
speed = 4.0
range = 25.0
health = 30
respawn_secs = 20

[[npc_kind]]
name = "guard"
behaviour = "patrol"
speed = 2.0
health = 100
respawn_secs = 60

[[spawn]]
kind = "deer"
zone = "meadow"
count = 40
around = [200.0, 200.0]
radius = 60.0

[[spawn]]
kind = "guard"
zone = "meadow"
count = 2
around = [10.0, 10.0]
radius = 0.0
route = [[10.0, 10.0], [60.0, 10.0], [60.0, 60.0]]

[[object_kind]]
name = "gate"
states = ["closed", "open"]

[[object]]
kind = "gate"
at = [120.0, 80.0]
"#;

    #[test]
    fn good_content_loads_whole() {
        let c = Content::parse(GOOD, BUILT_IN).unwrap();
        assert_eq!((c.zones.len(), c.npc_kinds.len(), c.spawns.len(), c.objects.len()), (1, 2, 2, 1));
        assert_eq!(c.entities(), 43);
        assert_eq!(c.spawns[1].route.len(), 3);
        assert_eq!(c.object_kinds[0].states, vec!["closed", "open"]);
    }

    #[test]
    fn every_mistake_names_its_line_and_field() {
        // (what to change, into what, text on the line the error must name, the field)
        let cases = [
            ("behaviour = \"flee\"", "behaviour = \"graze\"", "\"graze\"", "npc_kind[0].behaviour"),
            ("kind = \"deer\"\nzone", "kind = \"wolf\"\nzone", "\"wolf\"", "spawn[0].kind"),
            ("zone = \"meadow\"\ncount = 40", "zone = \"forest\"\ncount = 40", "\"forest\"", "spawn[0].zone"),
            ("around = [200.0, 200.0]", "around = [500.0, 200.0]", "[500.0", "spawn[0].around"),
            ("max = [400.0, 400.0]", "max = [0.0, 400.0]", "max = [0.0", "zone[0].max"),
            ("speed = 4.0", "speed = -1.0", "-1.0", "npc_kind[0].speed"),
            ("route = [[10.0, 10.0], [60.0, 10.0], [60.0, 60.0]]", "", "\"guard\"\nzone", "spawn[1].route"),
            (
                "route = [[10.0, 10.0], [60.0, 10.0],",
                "route = [[10.0, 10.0], [600.0, 10.0],",
                "[600.0",
                "spawn[1].route",
            ),
            ("states = [\"closed\", \"open\"]", "states = []", "states = []", "object_kind[0].states"),
            ("at = [120.0, 80.0]", "at = [120.0, -80.0]", "-80.0", "object[0].at"),
            (
                "states = [\"closed\", \"open\"]",
                "states = [\"ripe\"]\nrespawn_secs = -5.0",
                "-5.0",
                "object_kind[0].respawn_secs",
            ),
            ("health = 30", "health = 70000", "70000", "health"),
            ("count = 40", "count = 40\ncolour = \"red\"", "colour", "colour"),
            (
                "at = [120.0, 80.0]",
                "at = [120.0, 80.0]\n[[object]]\nkind = \"door\"\nat = [1.0, 1.0]",
                "\"door\"",
                "object[1].kind",
            ),
        ];
        for (from, to, on_line, field) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let line = text[..text.find(on_line).unwrap()].matches('\n').count() + 1;
            let e = Content::parse(&text, BUILT_IN).unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{from} -> {to}: {e}");
        }
        let e = Content::parse("", BUILT_IN).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (1, "zone"));
        assert_eq!(Content::parse("[[zone]\nname = 1", BUILT_IN).unwrap_err().line, 1);
    }

    #[test]
    fn the_demo_zone_loads_with_a_few_hundred_npcs_and_its_objects() {
        let c = Content::parse(crate::DEMO_ZONE, BUILT_IN).unwrap();
        let npcs: usize = c.spawns.iter().map(|s| s.count).sum();
        assert!((200..=1000).contains(&npcs), "{npcs} NPCs");
        assert!(c.objects.len() >= 5);
        assert!(c.objects.iter().any(|o| c.object_kinds[o.kind].respawn_secs.is_some()), "no items");
        for b in BUILT_IN {
            assert!(c.npc_kinds.iter().any(|k| k.behaviour == *b), "no {b} in the demo");
        }
    }
}
