//! `cohort-fanout` (issue 18's fan-out simulator), small: every node must
//! finish, the source must serve what each strategy reads from it, all from
//! the source must take N times one node's time, peer-to-peer must beat it and
//! never beat physics (a node receives no faster than its link, nor the
//! directory leaves the source faster than the source serves).
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

const PIECES: f64 = 16.0;
const PIECE_BYTES: f64 = 32.0 * 1024.0 * 1024.0;
const SIZE: f64 = PIECES * PIECE_BYTES;

/// One JSON object per node count.
fn run(args: &[&str]) -> Vec<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_cohort-fanout"))
        .args(["--json", "--pieces", "16", "--piece-mib", "32"])
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path).and_then(Value::as_f64).unwrap_or_else(|| panic!("{path} missing in {v}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn by_nodes(runs: &[Value], n: f64) -> &Value {
    runs.iter().find(|r| f(r, "/nodes") == n).unwrap()
}

/// What every run must show, whatever its options.
fn check_physics(runs: &[Value], pulls: f64) {
    for r in runs {
        let (n, one) = (f(r, "/nodes"), f(r, "/one_node_s"));
        for strategy in ["/p2p", "/source"] {
            let live = f(r, &format!("{strategy}/live"));
            assert_eq!(f(r, &format!("{strategy}/finished")), live, "every node finishes: {r}");
            let last = f(r, &format!("{strategy}/last_s"));
            assert!(last >= one * (1.0 - 1e-9), "{strategy}: faster than one node's link: {r}");
            assert!(f(r, &format!("{strategy}/mean_s")) <= last * (1.0 + 1e-9), "{r}");
        }
        assert_eq!(f(r, "/p2p/live"), n, "{r}");
        // Pullers read the whole directory once each; nobody else reads the source.
        assert!(close(f(r, "/p2p/source_bytes_per_node"), pulls.min(n) * SIZE / n), "{r}");
        assert!(close(f(r, "/source/source_bytes_per_node"), SIZE), "{r}");
        // Everything the others got came from peers.
        assert!(close(f(r, "/p2p/peer_bytes"), (n - pulls.min(n)) * SIZE), "{r}");
        assert!(close(f(r, "/source/last_s"), n * one), "all from a source of one link's rate: N times one node: {r}");
    }
}

#[test]
fn peer_to_peer_beats_the_source_and_keeps_to_physics() {
    let runs = run(&["--nodes", "1,8,64"]);
    assert_eq!(runs.len(), 3);
    check_physics(&runs, 1.0);
    let one = by_nodes(&runs, 1.0);
    let one_s = f(one, "/one_node_s");
    // 16 pieces of 32 MiB at 125 MB/s.
    assert!(close(one_s, SIZE / 125e6), "{one}");
    assert!(close(f(one, "/p2p/last_s"), one_s) && close(f(one, "/source/last_s"), one_s), "{one}");
    let eight = by_nodes(&runs, 8.0);
    assert!(f(eight, "/source/last_s") >= 7.0 * one_s, "all from the source grows with N: {eight}");
    assert!(f(eight, "/p2p/last_s") < 0.4 * f(eight, "/source/last_s"), "{eight}");
    let sixty_four = by_nodes(&runs, 64.0);
    assert!(f(sixty_four, "/p2p/last_s") < 4.0 * one_s, "{sixty_four}");
}

#[test]
fn more_pullers_read_more_from_the_source() {
    let runs = run(&["--nodes", "1,2,8", "--source-pulls", "2"]);
    check_physics(&runs, 2.0);
    // Two pullers share the source: neither gets it faster than half its rate.
    let eight = by_nodes(&runs, 8.0);
    assert!(f(eight, "/p2p/last_s") >= 2.0 * f(eight, "/one_node_s") * (1.0 - 1e-9), "{eight}");
}

#[test]
fn the_same_seed_gives_the_same_figures() {
    let strip = |mut runs: Vec<Value>| {
        for r in &mut runs {
            r.as_object_mut().unwrap().remove("wall_s");
        }
        runs
    };
    let args = ["--nodes", "8,64", "--seed", "7"];
    assert_eq!(strip(run(&args)), strip(run(&args)));
}

#[test]
fn dead_nodes_cost_transfers_and_the_rest_still_finish() {
    let runs = run(&["--nodes", "8,64", "--dead", "3@3"]);
    for r in &runs {
        let n = f(r, "/nodes");
        assert_eq!(f(r, "/p2p/live"), n - 3.0, "{r}");
        assert_eq!(f(r, "/p2p/finished"), n - 3.0, "{r}");
        assert!(f(r, "/p2p/last_s") >= f(r, "/one_node_s"), "{r}");
        // The source strategy is run without deaths.
        assert_eq!(f(r, "/source/finished"), n, "{r}");
    }
    assert!(runs.iter().map(|r| f(r, "/p2p/failed_transfers")).sum::<f64>() > 0.0, "{runs:?}");
}

#[test]
fn other_limits_sharing_and_policies_keep_to_physics() {
    for args in [
        &["--sharing", "max-min"][..],
        &["--total", "2", "--super-seed"],
        &["--rarity-over", "all", "--upload-slots", "1", "--per-peer", "2"],
        &["--source-mbps", "500"],
    ] {
        let runs = run(&[&["--nodes", "1,8,64"][..], args].concat());
        check_physics(&runs, 1.0);
    }
}

/// A wait per request (`--request-ms`) keeps to physics under both sharing
/// models, costs at least nothing and at most what the requests add up to:
/// with one node, whose pieces all come from the source (no requests), none;
/// with 8, the p2p time grows but by less than a wait per piece in a row.
#[test]
fn a_wait_per_request_costs_time_and_keeps_to_physics() {
    let base = run(&["--nodes", "1,8"]);
    for sharing in ["equal", "max-min"] {
        let waited = run(&["--nodes", "1,8", "--request-ms", "100", "--sharing", sharing]);
        check_physics(&waited, 1.0);
        assert!(close(f(by_nodes(&waited, 1.0), "/p2p/last_s"), f(by_nodes(&base, 1.0), "/p2p/last_s")));
        if sharing == "equal" {
            let (before, after) = (f(by_nodes(&base, 8.0), "/p2p/last_s"), f(by_nodes(&waited, 8.0), "/p2p/last_s"));
            assert!(after > before, "100 ms a request costs time: {before} -> {after}");
            assert!(after < before + PIECES * 0.1 + 1e-9, "at most a wait per piece in a row: {before} -> {after}");
        }
    }
}

/// Racks whose links to the core carry a quarter of their nodes' links:
/// with one node a rack fetching from the other racks (the controller's
/// `--topology-label`), each piece enters each rack exactly once (the
/// source's rack from the source); with any peer alike, again and again.
/// No rack receives faster than its core link.
#[test]
fn one_node_a_rack_brings_each_piece_into_its_rack_once() {
    let racked = |near: &str| {
        let runs = run(&["--nodes", "16", "--rack-nodes", "4", "--near", near]);
        assert_eq!(runs.len(), 1);
        runs.into_iter().next().unwrap()
    };
    let (near, far) = (racked("true"), racked("false"));
    for v in [&near, &far] {
        assert_eq!(f(v, "/p2p/finished"), 16.0, "{v}");
        let uplink = f(v, "/uplink_bytes_per_s");
        assert!(close(uplink, f(v, "/link_bytes_per_s")), "4 links over 4: {v}");
        // Racks 1 to 3 receive the whole directory over their core links.
        assert!(f(v, "/p2p/last_s") >= SIZE / uplink * (1.0 - 1e-9), "faster than a rack's core link: {v}");
    }
    let within = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b;
    assert!(within(f(&near, "/p2p/cross_rack_bytes"), 4.0 * SIZE), "once into each of 4 racks: {near}");
    assert!(f(&far, "/p2p/cross_rack_bytes") > 6.0 * SIZE, "{far}");
    // Every node from the source: each rack's 4 nodes pull the whole directory over its core link.
    assert!(within(f(&far, "/source/cross_rack_bytes"), 16.0 * SIZE), "{far}");
}
