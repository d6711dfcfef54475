//! The security hook: every grant map, grant copy and event-channel bind
//! asks [`Policy::check`] whether the subject's label may do it to the
//! object's label.
//!
//! Labels are the manifest's domain labels. A policy is a list of allow
//! rules `(subject, object, permissions)`; whatever no rule allows is
//! denied. Permissions are named after FLASK's classes on these paths
//! (`../shared/WIRE.md`, "XSM/FLASK on these paths"):
//!
//! | [`Perms`] | FLASK | asked by |
//! |---|---|---|
//! | [`Perms::GRANT_MAP_READ`] | `grant:map_read` | every grant map |
//! | [`Perms::GRANT_MAP_WRITE`] | `grant:map_write` | a grant map that is not read-only |
//! | [`Perms::GRANT_COPY`] | `grant:copy` | a grant copy, once per granting side |
//! | [`Perms::EVENT_BIND`] | `event:bind` | an interdomain bind |
//!
//! Decisions are made per pair of labels, so they are cached as Xen's
//! access vector cache does: [`AVC_SLOTS`] slots, each keyed by a label pair
//! and holding every permission the rules give that pair (its access
//! vector). A slot is valid only while its sequence number is the policy's;
//! [`Policy::set_rules`] bumps the policy's, which invalidates every slot at
//! once. The cache is direct-mapped (a pair's slot is a hash of its two
//! labels), so a collision only costs a recomputation.
//!
//! ```text
//!   check("guest_a", "blk_driver", MAP_READ)
//!        │ hash
//!        ▼
//!   ┌──────┬─────────┬──────────────┬───────────┐
//!   │ seq  │ subject │ object       │ allowed   │  seq == policy seq and labels
//!   ├──────┼─────────┼──────────────┼───────────┤  equal: a hit, answer from
//!   │  7   │ guest_a │ blk_driver   │ R|W|C     │  `allowed`; otherwise scan
//!   └──────┴─────────┴──────────────┴───────────┘  the rules and refill it
//! ```

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::BitOr;

/// A set of permissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);
    /// `grant:map_read`: map the object's grants (read-only or not).
    pub const GRANT_MAP_READ: Perms = Perms(1 << 0);
    /// `grant:map_write`: map the object's grants writable.
    pub const GRANT_MAP_WRITE: Perms = Perms(1 << 1);
    /// `grant:copy`: copy to or from the object's grants.
    pub const GRANT_COPY: Perms = Perms(1 << 2);
    /// `event:bind`: connect an event channel to the object.
    pub const EVENT_BIND: Perms = Perms(1 << 3);
    /// Every permission above.
    pub const ALL: Perms = Perms(0b1111);

    /// Each single permission with its FLASK name.
    pub const NAMED: [(Perms, &'static str); 4] = [
        (Perms::GRANT_MAP_READ, "grant:map_read"),
        (Perms::GRANT_MAP_WRITE, "grant:map_write"),
        (Perms::GRANT_COPY, "grant:copy"),
        (Perms::EVENT_BIND, "event:bind"),
    ];

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set with these bits; `None` if any is not a permission.
    pub const fn from_bits(bits: u8) -> Option<Perms> {
        if bits & !Perms::ALL.0 == 0 {
            Some(Perms(bits))
        } else {
            None
        }
    }

    /// Both sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The FLASK name of a single permission (`"grant:map_read"`);
    /// `"none"` for the empty set and `"several"` for more than one.
    pub fn name(self) -> &'static str {
        match Perms::NAMED.iter().find(|(p, _)| *p == self) {
            Some((_, n)) => n,
            None if self.is_empty() => "none",
            None => "several",
        }
    }

    /// The permission with this FLASK name (`"grant:copy"`).
    pub fn from_name(name: &str) -> Option<Perms> {
        Perms::NAMED
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(p, _)| *p)
    }
}

impl BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        self.union(rhs)
    }
}

/// One allow rule: `subject` may do `perms` to `object`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub subject: String,
    pub object: String,
    pub perms: Perms,
}

impl Rule {
    pub fn new(subject: &str, object: &str, perms: Perms) -> Self {
        Rule {
            subject: String::from(subject),
            object: String::from(object),
            perms,
        }
    }
}

/// Slots in the decision cache (Xen's AVC has 512; airlock has at most
/// `MAX_DOMAINS` domains and a handful of labels).
pub const AVC_SLOTS: usize = 128;

/// Longest label the cache holds; a longer one (the manifest allows none)
/// is decided from the rules every time.
pub const CACHED_LABEL_MAX: usize = 32;

/// A label copied into a cache slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SlotLabel {
    len: u8,
    bytes: [u8; CACHED_LABEL_MAX],
}

impl SlotLabel {
    const EMPTY: SlotLabel = SlotLabel {
        len: 0,
        bytes: [0; CACHED_LABEL_MAX],
    };

    fn new(s: &str) -> Option<SlotLabel> {
        let b = s.as_bytes();
        let len = u8::try_from(b.len())
            .ok()
            .filter(|&l| usize::from(l) <= CACHED_LABEL_MAX)?;
        let mut bytes = [0; CACHED_LABEL_MAX];
        bytes[..b.len()].copy_from_slice(b);
        Some(SlotLabel { len, bytes })
    }

    fn is(&self, s: &str) -> bool {
        self.bytes.get(..usize::from(self.len)) == Some(s.as_bytes())
    }
}

/// One cached decision: every permission `subject` has on `object` under
/// the policy numbered `seq`.
#[derive(Clone, Copy, Debug)]
struct Slot {
    seq: u64,
    subject: SlotLabel,
    object: SlotLabel,
    allowed: Perms,
}

impl Slot {
    /// Valid under no policy (policy sequence numbers start at 1).
    const EMPTY: Slot = Slot {
        seq: 0,
        subject: SlotLabel::EMPTY,
        object: SlotLabel::EMPTY,
        allowed: Perms::NONE,
    };
}

/// How the cache has done since the policy was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AvcStats {
    /// Decisions answered from a slot.
    pub hits: u64,
    /// Decisions computed from the rules (and cached when the labels fit).
    pub misses: u64,
}

/// The allow rules and their decision cache.
#[derive(Clone, Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The policy's sequence number: 1 for the first, bumped by each
    /// [`Policy::set_rules`]; never 0, which no slot is valid under.
    seq: u64,
    slots: Box<[Slot]>,
    stats: AvcStats,
}

/// FNV-1a over both labels, with a separator that no label contains.
fn slot_index(subject: &str, object: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = subject.bytes().chain([0xff]).chain(object.bytes());
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The remainder is below AVC_SLOTS, which fits a usize.
    (h % AVC_SLOTS as u64) as usize
}

impl Policy {
    /// A policy allowing exactly what `rules` allow.
    pub fn new(rules: Vec<Rule>) -> Self {
        Policy {
            rules,
            seq: 1,
            slots: vec![Slot::EMPTY; AVC_SLOTS].into_boxed_slice(),
            stats: AvcStats::default(),
        }
    }

    /// The policy that denies everything.
    pub fn deny_all() -> Self {
        Policy::new(Vec::new())
    }

    /// Whether `subject` may do every permission of `perms` to `object`.
    /// An empty `perms` is refused (a caller that asks for nothing has a
    /// bug; the hook fails closed).
    pub fn check(&mut self, subject: &str, object: &str, perms: Perms) -> bool {
        !perms.is_empty() && self.allowed(subject, object).contains(perms)
    }

    /// Every permission `subject` has on `object` (its access vector).
    pub fn allowed(&mut self, subject: &str, object: &str) -> Perms {
        let i = slot_index(subject, object);
        let seq = self.seq;
        if let Some(s) = self.slots.get(i) {
            if s.seq == seq && s.subject.is(subject) && s.object.is(object) {
                self.stats.hits += 1;
                return s.allowed;
            }
        }
        self.stats.misses += 1;
        let allowed = self.compute(subject, object);
        if let (Some(sl), Some(ol), Some(slot)) = (
            SlotLabel::new(subject),
            SlotLabel::new(object),
            self.slots.get_mut(i),
        ) {
            *slot = Slot {
                seq,
                subject: sl,
                object: ol,
                allowed,
            };
        }
        allowed
    }

    /// The decision from the rules alone.
    fn compute(&self, subject: &str, object: &str) -> Perms {
        self.rules
            .iter()
            .filter(|r| r.subject == subject && r.object == object)
            .fold(Perms::NONE, |acc, r| acc | r.perms)
    }

    /// Replaces the rules and invalidates every cached decision. What the
    /// new rules no longer allow must then be revoked by the caller (for
    /// grant mappings: `grant::GrantTables::revoke_disallowed`).
    pub fn set_rules(&mut self, rules: Vec<Rule>) {
        self.rules = rules;
        self.seq = match self.seq.wrapping_add(1) {
            0 => 1,
            s => s,
        };
    }

    /// The current policy's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn stats(&self) -> AvcStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    fn blk_policy() -> Policy {
        Policy::new(vec![
            Rule::new(
                "blk_driver",
                "guest_a",
                Perms::GRANT_MAP_READ | Perms::GRANT_MAP_WRITE,
            ),
            Rule::new("blk_driver", "guest_a", Perms::GRANT_COPY),
            Rule::new("blk_driver", "guest_b", Perms::GRANT_MAP_READ),
            Rule::new("guest_a", "blk_driver", Perms::EVENT_BIND),
        ])
    }

    #[test]
    fn default_deny() {
        let mut p = Policy::deny_all();
        for (perm, _) in Perms::NAMED {
            assert!(!p.check("a", "b", perm));
            assert!(!p.check("a", "a", perm));
        }
        let mut p = blk_policy();
        assert!(!p.check("unknown", "guest_a", Perms::GRANT_MAP_READ));
        assert!(!p.check("blk_driver", "unknown", Perms::GRANT_MAP_READ));
        assert!(!p.check("", "", Perms::GRANT_MAP_READ));
    }

    #[test]
    fn rules_allow_exactly_their_triples() {
        let mut p = blk_policy();
        let all = Perms::GRANT_MAP_READ | Perms::GRANT_MAP_WRITE | Perms::GRANT_COPY;
        assert!(p.check("blk_driver", "guest_a", Perms::GRANT_MAP_READ));
        assert!(p.check("blk_driver", "guest_a", Perms::GRANT_MAP_WRITE));
        // Two rules for one pair add up.
        assert!(p.check("blk_driver", "guest_a", all));
        assert!(!p.check("blk_driver", "guest_a", Perms::EVENT_BIND));
        assert!(p.check("blk_driver", "guest_b", Perms::GRANT_MAP_READ));
        assert!(!p.check("blk_driver", "guest_b", Perms::GRANT_MAP_WRITE));
        // Every asked permission must be allowed.
        assert!(!p.check(
            "blk_driver",
            "guest_b",
            Perms::GRANT_MAP_READ | Perms::GRANT_MAP_WRITE
        ));
        assert!(!p.check("blk_driver", "guest_b", Perms::GRANT_COPY));
        // Rules are directed.
        assert!(!p.check("guest_a", "blk_driver", Perms::GRANT_MAP_READ));
        assert!(p.check("guest_a", "blk_driver", Perms::EVENT_BIND));
        assert!(!p.check("blk_driver", "guest_a", Perms::EVENT_BIND));
        // Labels match whole.
        assert!(!p.check("blk_drive", "guest_a", Perms::GRANT_MAP_READ));
        assert!(!p.check("blk_driver", "guest_a2", Perms::GRANT_MAP_READ));
        assert_eq!(p.allowed("blk_driver", "guest_a"), all);
    }

    #[test]
    fn asking_for_nothing_is_refused() {
        let mut p = Policy::new(vec![Rule::new("a", "b", Perms::ALL)]);
        assert!(!p.check("a", "b", Perms::NONE));
        assert!(p.check("a", "b", Perms::ALL));
    }

    #[test]
    fn cache_hits_after_first_decision() {
        let mut p = blk_policy();
        assert!(p.check("blk_driver", "guest_a", Perms::GRANT_MAP_READ));
        assert_eq!(p.stats(), AvcStats { hits: 0, misses: 1 });
        // One slot holds the whole access vector of the pair.
        assert!(p.check("blk_driver", "guest_a", Perms::GRANT_COPY));
        assert!(!p.check("blk_driver", "guest_a", Perms::EVENT_BIND));
        assert_eq!(p.stats(), AvcStats { hits: 2, misses: 1 });
        // Denials are cached too.
        assert!(!p.check("x", "y", Perms::GRANT_COPY));
        assert!(!p.check("x", "y", Perms::GRANT_COPY));
        assert_eq!(p.stats(), AvcStats { hits: 3, misses: 2 });
    }

    #[test]
    fn new_rules_invalidate_the_cache() {
        let mut p = blk_policy();
        assert_eq!(p.seq(), 1);
        assert!(p.check("blk_driver", "guest_a", Perms::GRANT_MAP_WRITE));
        assert!(!p.check("guest_b", "blk_driver", Perms::EVENT_BIND));
        p.set_rules(vec![Rule::new("guest_b", "blk_driver", Perms::EVENT_BIND)]);
        assert_eq!(p.seq(), 2);
        let misses = p.stats().misses;
        assert!(!p.check("blk_driver", "guest_a", Perms::GRANT_MAP_WRITE));
        assert!(p.check("guest_b", "blk_driver", Perms::EVENT_BIND));
        assert_eq!(p.stats().misses, misses + 2);
        assert_eq!(p.rules().len(), 1);
        p.set_rules(Vec::new());
        assert_eq!(p.seq(), 3);
        assert!(!p.check("guest_b", "blk_driver", Perms::EVENT_BIND));
    }

    #[test]
    fn more_pairs_than_slots_stay_correct() {
        let mut rules = Vec::new();
        for i in 0..300 {
            let perm = Perms::NAMED[i % 4].0;
            rules.push(Rule::new(&format!("s{i}"), &format!("o{i}"), perm));
        }
        let mut p = Policy::new(rules);
        for _ in 0..3 {
            for i in 0..300 {
                let (s, o) = (format!("s{i}"), format!("o{i}"));
                for (j, (perm, _)) in Perms::NAMED.iter().enumerate() {
                    assert_eq!(p.check(&s, &o, *perm), j == i % 4, "{s} {o} {j}");
                }
                assert!(!p.check(&o, &s, Perms::NAMED[i % 4].0));
            }
        }
        assert!(p.stats().hits > 0);
    }

    #[test]
    fn long_labels_are_decided_uncached() {
        let long = "l".repeat(CACHED_LABEL_MAX + 1);
        let mut p = Policy::new(vec![Rule::new(&long, "b", Perms::GRANT_COPY)]);
        assert!(p.check(&long, "b", Perms::GRANT_COPY));
        assert!(p.check(&long, "b", Perms::GRANT_COPY));
        assert!(!p.check(&long[1..], "b", Perms::GRANT_COPY));
        assert_eq!(p.stats().hits, 0);
        let max = "m".repeat(CACHED_LABEL_MAX);
        p.set_rules(vec![Rule::new(&max, &max, Perms::GRANT_COPY)]);
        assert!(p.check(&max, &max, Perms::GRANT_COPY));
        assert!(p.check(&max, &max, Perms::GRANT_COPY));
        assert_eq!(p.stats().hits, 1);
    }

    #[test]
    fn perm_names() {
        for (perm, name) in Perms::NAMED {
            assert_eq!(perm.name(), name);
            assert_eq!(Perms::from_name(name), Some(perm));
            assert_eq!(Perms::from_bits(perm.bits()), Some(perm));
        }
        assert_eq!(Perms::NONE.name(), "none");
        assert_eq!(Perms::ALL.name(), "several");
        assert_eq!(Perms::from_name("grant:map"), None);
        assert_eq!(Perms::from_bits(0x10), None);
        assert_eq!(
            Perms::NAMED.iter().fold(Perms::NONE, |a, (p, _)| a | *p),
            Perms::ALL
        );
    }
}
