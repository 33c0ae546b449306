//! Finding the newest complete checkpoint in real directory trees.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use cohort_agent::checkpoint_search::{CheckpointError, latest_complete, search};
use cohort_shared::checkpoint::{Checkpoint, CheckpointLayout, TRACKER_FILE};
use tempfile::TempDir;

fn touch(path: &Path) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, b"x").unwrap();
}

fn tracker(dir: &Path, text: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(TRACKER_FILE), text).unwrap();
}

fn iter_name(iteration: u64) -> String {
    format!("iter_{iteration:07}")
}

/// A finished torch_dist checkpoint: shards, `.metadata`, `common.pt`, `metadata.json`.
fn torch_dist(dir: &Path, iteration: u64) {
    let iter = dir.join(iter_name(iteration));
    for file in ["__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt", "metadata.json"] {
        touch(&iter.join(file));
    }
}

/// What a save interrupted before rank 0 finalised looks like: shards and common.pt only.
fn half_written(dir: &Path, iteration: u64) {
    let iter = dir.join(iter_name(iteration));
    for file in ["__0_0.distcp", "common.pt"] {
        touch(&iter.join(file));
    }
}

/// ms-swift 4.x `checkpoint-N`, torch_dist inside, with or without its tracker.
fn swift_checkpoint(run: &Path, iteration: u64, with_tracker: bool) -> PathBuf {
    let dir = run.join(format!("checkpoint-{iteration}"));
    torch_dist(&dir, iteration);
    touch(&dir.join("args.json"));
    if with_tracker {
        tracker(&dir, &iteration.to_string());
    }
    dir
}

fn latest(dir: &Path) -> Checkpoint {
    latest_complete(dir).unwrap().expect("a complete checkpoint")
}

#[test]
fn v3_flat_layout_takes_the_tracked_iteration() {
    let save = TempDir::new().unwrap();
    torch_dist(save.path(), 50);
    torch_dist(save.path(), 100);
    tracker(save.path(), "100\n");
    let ckpt = latest(save.path());
    assert_eq!(ckpt.iteration, 100);
    assert_eq!(ckpt.path, save.path());
    assert_eq!(ckpt.run_dir, save.path());
    assert_eq!(ckpt.layout, CheckpointLayout::MegatronIter);
}

#[test]
fn v3_run_dir_is_found_under_the_save_dir() {
    let save = TempDir::new().unwrap();
    let run = save.path().join("v0-20260822-101500");
    torch_dist(&run, 50);
    tracker(&run, "50");
    let ckpt = latest(save.path());
    assert_eq!((ckpt.iteration, &ckpt.path, &ckpt.run_dir), (50, &run, &run));
}

#[test]
fn a_half_written_tracked_iteration_falls_back_to_the_previous_one() {
    let save = TempDir::new().unwrap();
    torch_dist(save.path(), 50);
    half_written(save.path(), 100);
    tracker(save.path(), "100");
    assert_eq!(latest(save.path()).iteration, 50);
}

#[test]
fn an_iteration_newer_than_the_tracker_is_still_being_written() {
    let save = TempDir::new().unwrap();
    torch_dist(save.path(), 50);
    torch_dist(save.path(), 100);
    tracker(save.path(), "50");
    assert_eq!(latest(save.path()).iteration, 50);
}

#[test]
fn a_tracker_naming_a_missing_dir_or_garbage_is_ignored() {
    let save = TempDir::new().unwrap();
    tracker(save.path(), "100");
    assert_eq!(latest_complete(save.path()).unwrap(), None);
    tracker(save.path(), "");
    torch_dist(save.path(), 100);
    assert_eq!(latest_complete(save.path()).unwrap(), None);
}

#[test]
fn v4_checkpoint_without_tracker_is_skipped() {
    let output = TempDir::new().unwrap();
    let run = output.path().join("v0-20260822-101500");
    let done = swift_checkpoint(&run, 200, true);
    swift_checkpoint(&run, 400, false);
    let ckpt = latest(output.path());
    assert_eq!(ckpt.iteration, 200);
    assert_eq!(ckpt.path, done);
    assert!(ckpt.path.ends_with("v0-20260822-101500/checkpoint-200"));
    assert_eq!(ckpt.run_dir, run);
    assert_eq!(ckpt.layout, CheckpointLayout::SwiftCheckpointN);
}

#[test]
fn safetensors_still_being_written_make_a_checkpoint_incomplete() {
    let output = TempDir::new().unwrap();
    let ckpt_dir = swift_checkpoint(output.path(), 300, true);
    touch(&ckpt_dir.join("model-00001-of-00002.safetensors"));
    fs::write(
        ckpt_dir.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    // The second safetensors shard is still being written.
    let found = search(output.path()).unwrap();
    assert_eq!(found.found, None);
    assert!(found.skipped[0].reason.contains("safetensors files that are missing"), "{:?}", found.skipped);
    touch(&ckpt_dir.join("model-00002-of-00002.safetensors"));
    let ckpt = latest(output.path());
    assert_eq!((ckpt.iteration, &ckpt.path), (300, &ckpt_dir));
    assert_eq!(ckpt.run_dir, output.path());
}

/// What ms-swift writes with `save_safetensors` (its default) and `no_save_optim`: the mcore
/// checkpoint without the model (iter_* holds only common.pt), the weights as safetensors.
fn weightless_checkpoint(run: &Path, iteration: u64) -> PathBuf {
    let dir = run.join(format!("checkpoint-{iteration}"));
    touch(&dir.join(iter_name(iteration)).join("common.pt"));
    tracker(&dir, &iteration.to_string());
    touch(&dir.join("args.json"));
    touch(&dir.join("model.safetensors"));
    touch(&dir.join("config.json"));
    dir
}

#[test]
fn a_checkpoint_without_model_weights_is_not_resumable_and_says_why() {
    let output = TempDir::new().unwrap();
    let run = output.path().join("v0-20261205-042720");
    let resumable = swift_checkpoint(&run, 10, true);
    let weightless = weightless_checkpoint(&run, 20);
    let found = search(output.path()).unwrap();
    assert_eq!(found.found.as_ref().map(|c| (c.iteration, &c.path)), Some((10, &resumable)));
    let [skipped] = &found.skipped[..] else { panic!("{:?}", found.skipped) };
    assert_eq!(skipped.path, weightless.join(iter_name(20)));
    assert!(skipped.reason.contains("holds no model weights"), "{skipped}");
    assert!(skipped.reason.contains("no_save_optim"), "{skipped}");

    // Nothing else: no checkpoint to resume from, and the reason.
    let only = TempDir::new().unwrap();
    weightless_checkpoint(&only.path().join("v0-20261205-042720"), 20);
    let found = search(only.path()).unwrap();
    assert_eq!(found.found, None);
    assert_eq!(found.skipped.len(), 1, "{:?}", found.skipped);
    assert_eq!(latest_complete(only.path()).unwrap(), None);
}

#[test]
fn ms_swift_3_10_layout_with_merged_lora_and_last_checkpoint_link() {
    // ms-swift 3.10+ / 4.x: <save>/vN-<ts>/checkpoint-N/{tracker, iter_N/}; with merge_lora a
    // checkpoint-N-merged copy (3.12.6 trainers/base.py:1060-1063), and 4.6 keeps a
    // `last-checkpoint` symlink (utils/io_utils.py:113-139). Only checkpoint-N counts.
    let output = TempDir::new().unwrap();
    let run = output.path().join("v3-20261205-042720");
    let ckpt = swift_checkpoint(&run, 30, true);
    let merged = run.join("checkpoint-40-merged");
    torch_dist(&merged, 40);
    tracker(&merged, "40");
    std::os::unix::fs::symlink("checkpoint-30", run.join("last-checkpoint")).unwrap();
    let found = latest(output.path());
    assert_eq!((found.iteration, &found.path, found.layout), (30, &ckpt, CheckpointLayout::SwiftCheckpointN));
    // The save dir given as the run dir itself, or as the checkpoint dir, finds the same.
    assert_eq!(latest(&run).path, ckpt);
    assert_eq!(latest(&ckpt).path, ckpt);
}

#[test]
fn the_newest_run_wins_even_with_a_lower_iteration() {
    let output = TempDir::new().unwrap();
    swift_checkpoint(&output.path().join("v0-20260822-101500"), 400, true);
    let newest = output.path().join("v1-20260822-120000");
    swift_checkpoint(&newest, 100, true);
    let ckpt = latest(output.path());
    assert_eq!((ckpt.iteration, &ckpt.run_dir), (100, &newest));
}

#[test]
fn runs_sort_by_version_number_not_text() {
    let output = TempDir::new().unwrap();
    swift_checkpoint(&output.path().join("v9-20260822-101500"), 900, true);
    let v10 = output.path().join("v10-20260822-091500");
    swift_checkpoint(&v10, 100, true);
    assert_eq!(latest(output.path()).run_dir, v10);
}

#[test]
fn a_newest_run_without_checkpoints_falls_back_to_the_older_run() {
    let output = TempDir::new().unwrap();
    let older = output.path().join("v0-20260822-101500");
    swift_checkpoint(&older, 200, true);
    let newest = output.path().join("v1-20260822-120000");
    swift_checkpoint(&newest, 50, false);
    touch(&newest.join("args.json"));
    let ckpt = latest(output.path());
    assert_eq!((ckpt.iteration, &ckpt.run_dir), (200, &older));
}

#[test]
fn legacy_mp_rank_checkpoints_need_every_rank_file() {
    let save = TempDir::new().unwrap();
    let iter = save.path().join(iter_name(10));
    touch(&iter.join("mp_rank_00").join("model_optim_rng.pt"));
    fs::create_dir_all(iter.join("mp_rank_01")).unwrap();
    tracker(save.path(), "10");
    assert_eq!(latest_complete(save.path()).unwrap(), None);
    touch(&iter.join("mp_rank_01").join("model_optim_rng.pt"));
    assert_eq!(latest(save.path()).iteration, 10);
}

#[test]
fn release_tracker_is_iteration_zero_in_the_release_dir() {
    let save = TempDir::new().unwrap();
    tracker(save.path(), "release");
    assert_eq!(latest_complete(save.path()).unwrap(), None);
    touch(&save.path().join("release").join("common.pt"));
    touch(&save.path().join("release").join("metadata.json"));
    assert_eq!(latest_complete(save.path()).unwrap(), None, "no shards: no weights");
    touch(&save.path().join("release").join("__0_0.distcp"));
    assert_eq!(latest(save.path()).iteration, 0);
}

#[test]
fn empty_dir_has_no_checkpoint() {
    let save = TempDir::new().unwrap();
    fs::create_dir_all(save.path().join("v0-20260822-101500").join("runs")).unwrap();
    assert_eq!(latest_complete(save.path()).unwrap(), None);
}

#[test]
fn missing_dir_is_an_error_naming_it() {
    let root = TempDir::new().unwrap();
    let missing = root.path().join("megatron_output").join("Qwen3-8B-sft");
    let error = latest_complete(&missing).unwrap_err();
    assert!(matches!(error, CheckpointError::Missing { .. }));
    let message = error.to_string();
    assert!(message.contains(&missing.display().to_string()), "{message}");
    let file = root.path().join("not-a-dir");
    touch(&file);
    assert!(matches!(latest_complete(&file), Err(CheckpointError::NotADirectory { .. })));
}
