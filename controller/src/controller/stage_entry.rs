//! A pipeline stage's state machine: the only code that changes a stage's
//! state and its timestamps. Stages are kept in their pipeline's record (proto
//! `PipelineStage`), so the transitions are methods on it.

use cohort_proto::{PipelineStage, StageState, now_unix_ms};

pub(super) trait StageTransitions {
    /// Work before or after its runs (a cache lookup, a checkpoint search).
    fn resolving(&mut self, reason: &str);
    /// Its runs are submitted.
    fn running(&mut self, runs: Vec<String>, result_paths: Vec<String>);
    fn succeeded(&mut self);
    /// A converted checkpoint from the cache stands in for the stage's run.
    fn cached(&mut self, output: String, cache_key: String, reason: &str);
    fn failed(&mut self, reason: String);
    /// Never run: the pipeline ended, or an earlier stage failed.
    fn skipped(&mut self, reason: &str);
}

impl StageTransitions for PipelineStage {
    fn resolving(&mut self, reason: &str) {
        self.state = StageState::Resolving as i32;
        self.reason = reason.into();
        self.started_unix_ms = started(self.started_unix_ms);
    }

    fn running(&mut self, runs: Vec<String>, result_paths: Vec<String>) {
        self.runs = runs;
        self.result_paths = result_paths;
        self.state = StageState::Running as i32;
        self.reason = String::new();
        self.started_unix_ms = started(self.started_unix_ms);
    }

    fn succeeded(&mut self) {
        self.state = StageState::Succeeded as i32;
        self.reason = String::new();
        self.finished_unix_ms = now_unix_ms();
    }

    fn cached(&mut self, output: String, cache_key: String, reason: &str) {
        self.output = output;
        self.cache_key = cache_key;
        self.state = StageState::Cached as i32;
        self.reason = reason.into();
        self.finished_unix_ms = now_unix_ms();
    }

    fn failed(&mut self, reason: String) {
        self.state = StageState::Failed as i32;
        self.reason = reason;
        // A stage that fails to start (its runs do not validate) was started too.
        self.started_unix_ms = started(self.started_unix_ms);
        self.finished_unix_ms = now_unix_ms();
    }

    fn skipped(&mut self, reason: &str) {
        self.state = StageState::Skipped as i32;
        self.reason = reason.into();
    }
}

/// A stage keeps the time it first started.
fn started(unix_ms: i64) -> i64 {
    if unix_ms == 0 { now_unix_ms() } else { unix_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_keeps_its_first_start_and_ends_with_a_finish_time() {
        let mut stage = PipelineStage { name: "convert".into(), ..PipelineStage::default() };
        stage.resolving("looking in the conversion cache");
        let first = stage.started_unix_ms;
        assert!(first > 0);
        assert_eq!(stage.state, StageState::Resolving as i32);
        stage.running(vec!["p-1.convert".into()], vec![String::new()]);
        assert_eq!((stage.state, stage.started_unix_ms), (StageState::Running as i32, first));
        assert!(stage.reason.is_empty());
        stage.resolving("finding its newest complete checkpoint");
        assert_eq!(stage.started_unix_ms, first, "resolving after the run keeps the start");
        assert_eq!(stage.finished_unix_ms, 0);
        stage.failed("p-1.convert failed: rank 0 died".into());
        assert_eq!(stage.state, StageState::Failed as i32);
        assert!(stage.finished_unix_ms >= first);

        let mut stage = PipelineStage::default();
        stage.cached("/cache/k".into(), "k".into(), "found in the conversion cache");
        assert_eq!(
            (stage.state, stage.output.as_str(), stage.cache_key.as_str()),
            (StageState::Cached as i32, "/cache/k", "k")
        );
        assert!(stage.finished_unix_ms > 0);
        let mut stage = PipelineStage::default();
        stage.failed("its job does not validate".into());
        assert!(stage.started_unix_ms > 0 && stage.finished_unix_ms >= stage.started_unix_ms);
        let mut stage = PipelineStage::default();
        stage.skipped("an earlier stage failed");
        assert_eq!((stage.state, stage.finished_unix_ms), (StageState::Skipped as i32, 0), "a skipped stage never ran");
    }
}
