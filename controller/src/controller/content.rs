//! Which node holds which staged content, and who fetches it from whom
//! (peer-to-peer staging, issue 18; the agents' side is `cohort_agent::peer`).
//!
//! Content is known by its user (a job's `user:`, whose cache holds it) and
//! its digest. A node holds it once it reported it staged; it stages it from
//! the moment it is sent a preparation that names it until it reports. When
//! an attempt's nodes need content that nobody holds or stages, at most
//! `--max-source-pulls` of them read the source; every other node gets
//! those, the other holders and the rest of the gang as its peers, and
//! fetches from them (the pullers offer each file as soon as it is copied).
//! Content without a digest is known only once a node has read it: the
//! first `--max-source-pulls` nodes of the gang read it, the others wait for
//! the digest they report (`JobEntry::awaited_digests`,
//! `Controller::answer_digests`) and are then assigned peers for it here.
//! What the tracker knows lives in memory; a controller that starts (or
//! takes over) learns it again from each node's caches when the node's
//! session opens (`Controller::learn_holdings`): complete content under its
//! cache's user name, and under `""` for the node's rank-user. A job whose
//! `user:` names its user otherwise (a submitter's mapping) reads its
//! source once more after a restart.
//! A holder that evicted the content meanwhile answers "not here" and its
//! peers fetch from others.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A job's `user:` and a content digest.
type Key = (String, String);

#[derive(Debug, Default)]
pub(super) struct ContentTracker {
    holders: HashMap<Key, BTreeSet<String>>,
    /// What each node stages now, by (node, job, attempt).
    staging: HashMap<(String, String, u32), Vec<Key>>,
}

impl ContentTracker {
    /// The peers of each node of an attempt's `gang` for content `key`,
    /// recording the gang as staging it. `live`: a node that is connected and
    /// serves its peers; `current`: whether a (job, attempt) still prepares.
    /// A node without peers reads the source.
    pub(super) fn assign(
        &mut self,
        key: (&str, &str),
        gang: &[String],
        attempt: (&str, u32),
        max_pulls: usize,
        live: impl Fn(&str) -> bool,
        current: impl Fn(&str, u32) -> bool,
    ) -> BTreeMap<String, Vec<String>> {
        self.staging.retain(|(node, job, attempt), _| live(node) && current(job, *attempt));
        let key = (key.0.to_owned(), key.1.to_owned());
        let mut others: BTreeSet<String> =
            self.holders.get(&key).into_iter().flatten().filter(|n| live(n)).cloned().collect();
        others
            .extend(self.staging.iter().filter(|(_, keys)| keys.contains(&key)).map(|((node, _, _), _)| node.clone()));
        let serving: Vec<&String> = gang.iter().filter(|n| live(n)).collect();
        let pullers: BTreeSet<&String> =
            if others.is_empty() { serving.iter().copied().take(max_pulls.max(1)).collect() } else { BTreeSet::new() };
        let mut peers = BTreeMap::new();
        for node in gang {
            self.staging.entry((node.clone(), attempt.0.to_owned(), attempt.1)).or_default().push(key.clone());
            // A node that serves nobody still fetches from the others.
            let list: Vec<String> = if pullers.contains(node) {
                Vec::new()
            } else {
                let all: BTreeSet<&String> = others.iter().chain(serving.iter().copied()).collect();
                all.into_iter().filter(|n| *n != node).cloned().collect()
            };
            peers.insert(node.clone(), list);
        }
        peers
    }

    /// A node reported its preparation: what it staged (each `(user,
    /// digest)` it was sent and reported without error) it now holds.
    pub(super) fn prepared(&mut self, node: &str, attempt: (&str, u32), staged: &[cohort_proto::StagedInput]) {
        let Some(keys) = self.staging.remove(&(node.to_owned(), attempt.0.to_owned(), attempt.1)) else { return };
        for key in keys {
            if staged.iter().any(|s| s.error.is_empty() && s.sha256 == key.1) {
                self.holders.entry(key).or_default().insert(node.to_owned());
            }
        }
    }

    /// `node`'s cache for `user` (a job's `user:`, empty for the node's
    /// rank-user) holds complete content `digest`, as it listed when its
    /// session opened.
    pub(super) fn held(&mut self, node: &str, user: &str, digest: &str) {
        self.holders.entry((user.to_owned(), digest.to_owned())).or_default().insert(node.to_owned());
    }

    /// The content was removed from a node's cache.
    pub(super) fn evicted(&mut self, node: &str, digest: &str) {
        for ((_, d), nodes) in self.holders.iter_mut() {
            if d == digest {
                nodes.remove(node);
            }
        }
        self.holders.retain(|_, nodes| !nodes.is_empty());
    }
}

/// With racks (the controller's `--topology-label`): the fetching nodes of a
/// rack keep only their rack's peers, except one, the rack's leader (its
/// first node by name), which keeps the others too; so the content crosses
/// the links between racks once per rack, through the leader, and spreads
/// inside the rack from it. A rack that has a feed already (a node of it
/// reads the source, or a peer in it from outside the gang holds or stages
/// the content) has no leader. A node without a rack, or left with no peer
/// by the rule, keeps its peers. Its cost where the core is not
/// oversubscribed: the leader's link feeds its whole rack (in
/// `cohort-fanout`'s model, 1,024 nodes in racks of 16: 3.29x one node's
/// time against 1.99x without; with racks 4:1 oversubscribed, 3.38x against
/// 4.92x), so it is off unless a label is named.
pub(super) fn localize(peers: &mut BTreeMap<String, Vec<String>>, rack: impl Fn(&str) -> Option<String>) {
    let mut fed: BTreeSet<String> = BTreeSet::new();
    for (node, list) in peers.iter() {
        let Some(r) = rack(node) else { continue };
        if list.is_empty() {
            fed.insert(r);
        }
    }
    for list in peers.values() {
        for peer in list.iter().filter(|p| !peers.contains_key(*p)) {
            fed.extend(rack(peer));
        }
    }
    let mut leaders: BTreeMap<String, String> = BTreeMap::new();
    for (node, list) in peers.iter() {
        if let Some(r) = rack(node).filter(|r| !fed.contains(r) && !list.is_empty()) {
            leaders.entry(r).or_insert_with(|| node.clone());
        }
    }
    for (node, list) in peers.iter_mut() {
        let Some(r) = rack(node) else { continue };
        if leaders.get(&r) == Some(node) {
            continue;
        }
        let local: Vec<String> = list.iter().filter(|p| rack(p).as_ref() == Some(&r)).cloned().collect();
        if !local.is_empty() {
            *list = local;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Racks r1 (a, b, c) and r2 (d, e), f without a rack; a reads the
    /// source: r1 is fed by it, r2's first node leads.
    #[test]
    fn a_rack_fetches_from_other_racks_through_one_node() {
        let rack = |n: &str| match n {
            "a" | "b" | "c" | "h" => Some("r1".to_owned()),
            "d" | "e" => Some("r2".to_owned()),
            _ => None,
        };
        let gang = names(&["a", "b", "c", "d", "e", "f"]);
        let mut tracker = ContentTracker::default();
        let mut peers = tracker.assign(("u", "x"), &gang, ("j1", 1), 1, |_| true, |_, _| true);
        localize(&mut peers, rack);
        assert!(peers["a"].is_empty(), "reads the source");
        assert_eq!(peers["b"], names(&["a", "c"]), "r1 has the source's reader: its rack only");
        assert_eq!(peers["c"], names(&["a", "b"]));
        assert_eq!(peers["d"], names(&["a", "b", "c", "e", "f"]), "r2's leader: every peer");
        assert_eq!(peers["e"], names(&["d"]), "through its leader");
        assert_eq!(peers["f"], names(&["a", "b", "c", "d", "e"]), "no rack: every peer");

        // A later job on r2's nodes and one of r1 (h): the holders are in
        // both racks, so every node fetches from its own rack.
        tracker.prepared("a", ("j1", 1), &[staged("x")]);
        tracker.prepared("d", ("j1", 1), &[staged("x")]);
        let mut later = tracker.assign(("u", "x"), &names(&["e", "h"]), ("j2", 1), 1, |_| true, |j, _| j == "j2");
        localize(&mut later, rack);
        assert_eq!(later["e"], names(&["d"]));
        assert_eq!(later["h"], names(&["a"]));
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn staged(digest: &str) -> cohort_proto::StagedInput {
        cohort_proto::StagedInput { sha256: digest.into(), ..Default::default() }
    }

    #[test]
    fn one_node_of_a_gang_reads_the_source_the_others_fetch_from_the_gang_and_later_gangs_from_the_holders() {
        let mut tracker = ContentTracker::default();
        let gang = names(&["a", "b", "c"]);
        let peers = tracker.assign(("u", "d1"), &gang, ("j1", 1), 1, |_| true, |_, _| true);
        assert_eq!(peers["a"], Vec::<String>::new(), "the first node pulls from the source");
        assert_eq!(peers["b"], names(&["a", "c"]));
        assert_eq!(peers["c"], names(&["a", "b"]));
        // Two pulls allowed: a and b read the source.
        let mut two = ContentTracker::default();
        let peers = two.assign(("u", "d1"), &gang, ("j1", 1), 2, |_| true, |_, _| true);
        assert!(peers["a"].is_empty() && peers["b"].is_empty());
        assert_eq!(peers["c"], names(&["a", "b"]));

        // While the first gang stages, a second gang fetches from it: no new pull.
        let peers = tracker.assign(("u", "d1"), &names(&["d", "e"]), ("j2", 1), 1, |_| true, |_, _| true);
        assert_eq!(peers["d"], names(&["a", "b", "c", "e"]));
        // a and b report; c fails its staging.
        tracker.prepared("a", ("j1", 1), &[staged("d1")]);
        tracker.prepared("b", ("j1", 1), &[staged("d1")]);
        tracker.prepared("c", ("j1", 1), &[cohort_proto::StagedInput { error: "boom".into(), ..staged("d1") }]);
        // j2 is over; a third gang gets the holders (and not c, nor d and e).
        let peers = tracker.assign(("u", "d1"), &names(&["f"]), ("j3", 1), 1, |_| true, |job, _| job == "j3");
        assert_eq!(peers["f"], names(&["a", "b"]), "from the holders, not the source");
        // Another user's content, or another digest, is nobody's yet.
        let peers = tracker.assign(("v", "d1"), &names(&["f"]), ("j4", 1), 1, |_| true, |_, _| true);
        assert!(peers["f"].is_empty());
        // A holder that is not live (lost, or serves no peers) is not offered.
        let peers = tracker.assign(("u", "d1"), &names(&["g"]), ("j5", 1), 1, |n| n != "a", |job, _| job == "j5");
        assert_eq!(peers["g"], names(&["b"]), "f never reported, and its attempt is over");
        tracker.evicted("b", "d1");
        let peers = tracker.assign(("u", "d1"), &names(&["h"]), ("j6", 1), 1, |n| n != "a", |job, _| job == "j6");
        assert!(peers["h"].is_empty(), "no live holder left: h reads the source");
    }
}
