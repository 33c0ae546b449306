//! Statistics over the valid rows, gathered in one pass with memory bounded by
//! the number of distinct values (lengths, turn counts), not by the number of rows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::SHORT_ANSWER_CHARS;
use super::row::{Conversation, Role};

/// A summary of one distribution. Percentiles are nearest-rank, so `p50` is
/// the (lower) median and every figure is a value that occurs in the data.
/// All zero when `count` is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    pub count: u64,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub max: u64,
    pub mean: f64,
}

/// Exact counts of each value seen.
#[derive(Debug, Default)]
pub(super) struct Histogram {
    counts: BTreeMap<u64, u64>,
    count: u64,
    sum: u128,
}

impl Histogram {
    pub(super) fn add(&mut self, value: u64) {
        *self.counts.entry(value).or_default() += 1;
        self.count += 1;
        self.sum += u128::from(value);
    }

    pub(super) fn summary(&self) -> Distribution {
        let (Some((&min, _)), Some((&max, _))) = (self.counts.first_key_value(), self.counts.last_key_value()) else {
            return Distribution::default();
        };
        Distribution {
            count: self.count,
            min,
            p50: self.percentile(50),
            p90: self.percentile(90),
            max,
            mean: self.sum as f64 / self.count as f64,
        }
    }

    /// The smallest value with at least `percent`% of the values at or below it.
    fn percentile(&self, percent: u64) -> u64 {
        let rank = (u128::from(self.count) * u128::from(percent)).div_ceil(100).max(1);
        let mut seen = 0u128;
        for (&value, &count) in &self.counts {
            seen += u128::from(count);
            if seen >= rank {
                return value;
            }
        }
        0
    }
}

/// Running totals over the valid rows of one format.
#[derive(Debug, Default)]
pub(super) struct StatsAccumulator {
    pub rows: usize,
    /// Assistant answers per row.
    pub turns: Histogram,
    pub user_chars: Histogram,
    pub assistant_chars: Histogram,
    pub single_turn_rows: usize,
    pub short_answers: usize,
    pub empty_answers: usize,
    pub system_prompt_rows: usize,
    pub tool_rows: usize,
}

impl StatsAccumulator {
    pub(super) fn add(&mut self, conversation: &Conversation) {
        self.rows += 1;
        let mut answers = 0u64;
        let (mut system, mut tools) = (false, false);
        for turn in &conversation.turns {
            let chars = u64::try_from(turn.chars).unwrap_or(u64::MAX);
            match turn.role {
                Role::System => system = true,
                Role::User => self.user_chars.add(chars),
                Role::Assistant => {
                    answers += 1;
                    self.assistant_chars.add(chars);
                    if turn.chars < SHORT_ANSWER_CHARS {
                        self.short_answers += 1;
                    }
                    if turn.chars == 0 {
                        self.empty_answers += 1;
                    }
                }
                Role::ToolCall | Role::ToolResponse | Role::Tool => tools = true,
            }
        }
        self.turns.add(answers);
        self.single_turn_rows += usize::from(answers == 1);
        self.system_prompt_rows += usize::from(system);
        self.tool_rows += usize::from(tools);
    }
}
