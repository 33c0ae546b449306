use super::*;

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::to_string).collect()
}

fn classify_text(text: &str, exit_code: Option<i32>, signal: Option<i32>) -> Classification {
    let lines = lines(text);
    classify(&ExitEvidence { exit_code, signal, root_cause: "", lines: &lines })
}

#[test]
fn cuda_out_of_memory_wins_over_the_teardown_after_it() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/cuda-oom.log"), Some(1), None);
    assert_eq!(c.cause, FailureCause::CudaOom);
    assert!(c.detail.starts_with("[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB"));
    assert!(!c.cause.retried_by_default());
    assert!(c.decisive.iter().any(|l| l.contains("OutOfMemoryError")));
}

#[test]
fn nccl_watchdog_timeout_keeps_the_nccl_message() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/nccl-timeout.log"), None, Some(6));
    assert_eq!(c.cause, FailureCause::Nccl);
    // The last NCCL line is the decisive one; the timeout line is among the context.
    assert!(c.decisive.iter().any(|l| l.contains("Watchdog caught collective operation timeout")), "{c:?}");
    assert!(c.cause.retried_by_default());
    assert_eq!(c.cause.event(), FailureCause::RankFailed);
}

#[test]
fn nccl_system_error() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/nccl-error.log"), Some(1), None);
    assert_eq!(c.cause, FailureCause::Nccl);
    assert!(c.detail.contains("ncclSystemError") || c.detail.contains("NCCL error"), "{c:?}");
}

#[test]
fn transformer_engine_without_its_pytorch_module_is_an_import_error() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/transformer-engine.log"), Some(1), None);
    assert_eq!(c.cause, FailureCause::ImportError);
    assert_eq!(c.detail, "AttributeError: module 'transformer_engine' has no attribute 'pytorch'");
    assert!(!c.cause.retried_by_default());
    assert!(c.cause.blames_node());
}

#[test]
fn kernel_oom_killer() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/kernel-oom.log"), None, Some(9));
    assert_eq!(c.cause, FailureCause::KernelOom);
    assert!(c.detail.contains("Out of memory: Killed process 208585 (python3)"), "{c:?}");
    assert!(!c.cause.retried_by_default());
}

#[test]
fn full_disk() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/disk-full.log"), Some(1), None);
    assert_eq!(c.cause, FailureCause::DiskFull);
    assert!(c.detail.contains("No space left on device"));
    assert!(!c.cause.retried_by_default());
}

#[test]
fn argparse_rejecting_a_flag_is_a_user_error() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/bad-arguments.log"), Some(2), None);
    assert_eq!(c.cause, FailureCause::UserError);
    assert!(c.detail.contains("unrecognized arguments: --lr_warmup_fraktion"));
    assert!(!c.cause.retried_by_default());
}

#[test]
fn a_plain_exception_is_a_rank_failure_with_the_exception_as_detail() {
    let c = classify_text(include_str!("../../tests/fixtures/failures/value-error.log"), Some(1), None);
    assert_eq!(c.cause, FailureCause::RankFailed);
    assert_eq!(c.detail, "exited with code 1: ValueError: global_batch_size 16 is not divisible by micro_batch_size 3");
    assert!(c.cause.retried_by_default());
}

#[test]
fn torchrun_root_cause_and_signal_without_a_known_pattern() {
    let text = include_str!("../../tests/fixtures/failures/torchrun-child-failed.log");
    let lines = lines(text);
    let c = classify(&ExitEvidence {
        exit_code: Some(1),
        signal: None,
        root_cause: "torchrun root cause: rank 4 exited with code -9, SIGKILL",
        lines: &lines,
    });
    assert_eq!(c.cause, FailureCause::RankFailed);
    assert!(
        c.detail.contains("exited with code 1 (torchrun root cause: rank 4 exited with code -9, SIGKILL)"),
        "{c:?}"
    );

    let c = classify(&ExitEvidence { exit_code: None, signal: Some(9), root_cause: "", lines: &[] });
    assert_eq!(c.cause, FailureCause::RankFailed);
    assert_eq!(c.detail, "killed by signal 9 (SIGKILL)");
}

#[test]
fn the_stronger_cause_wins_when_both_appear() {
    // A rank OOMs; its peers then report NCCL errors in the same output.
    let mut text = include_str!("../../tests/fixtures/failures/nccl-error.log").to_string();
    text.push_str(include_str!("../../tests/fixtures/failures/cuda-oom.log"));
    assert_eq!(classify_text(&text, Some(1), None).cause, FailureCause::CudaOom);
}

#[test]
fn names_round_trip() {
    for cause in ALL_CAUSES {
        assert_eq!(FailureCause::from_name(cause.name()), Some(*cause));
    }
    assert_eq!(FailureCause::from_name("oom"), None);
}
