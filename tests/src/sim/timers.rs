//! The simulator's timer queue: each host's next wake-up in one heap, so that finding the next
//! timer costs a logarithm of the hosts rather than a poll of every one of them per step.
//!
//! A host's entry is replaced whenever its wake-up changes; replaced entries stay in the heap
//! until they reach its top (or the heap is rebuilt) and are skipped there by generation.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Hosts' wake-ups, earliest first. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Per host: the generation of its live entry, and when it wakes.
    slots: Vec<(u64, Option<Instant>)>,
    /// Hosts whose wake-up may have changed since it was last read.
    dirty: Vec<usize>,
    is_dirty: Vec<bool>,
}

impl Timers {
    /// Notes that `host` may want another wake-up; [`Timers::refresh`] reads it again.
    pub(super) fn touch(&mut self, host: usize) {
        if self.is_dirty.len() <= host {
            self.is_dirty.resize(host + 1, false);
        }
        if !self.is_dirty[host] {
            self.is_dirty[host] = true;
            self.dirty.push(host);
        }
    }

    /// Reads the wake-up of every host touched since the last refresh.
    pub(super) fn refresh(&mut self, mut wake: impl FnMut(usize) -> Option<Instant>) {
        for host in std::mem::take(&mut self.dirty) {
            self.is_dirty[host] = false;
            let at = wake(host);
            self.set(host, at);
        }
    }

    fn set(&mut self, host: usize, at: Option<Instant>) {
        if self.slots.len() <= host {
            self.slots.resize(host + 1, (0, None));
        }
        let slot = &mut self.slots[host];
        if slot.1 == at {
            return;
        }
        slot.0 += 1;
        slot.1 = at;
        if let Some(t) = at {
            self.heap.push(Reverse((t, host, slot.0)));
        }
        // Replaced entries past a few per host: rebuild from the live ones.
        if self.heap.len() > 4 * self.slots.len() + 1024 {
            let live = self.slots.iter().enumerate().filter_map(|(h, &(g, t))| Some(Reverse((t?, h, g))));
            self.heap = live.collect();
        }
    }

    /// The earliest wake-up and its host (at `now` if it is past). Ties go to the lower host.
    pub(super) fn next(&mut self, now: Instant) -> Option<(Instant, usize)> {
        while let Some(&Reverse((t, host, generation))) = self.heap.peek() {
            if self.slots[host].0 == generation {
                return Some((t.max(now), host));
            }
            self.heap.pop();
        }
        None
    }
}
