//! Any bytes as a message of the controller-to-agent session stream: decoding
//! and the agent's checks return the command or an error naming the field at
//! fault; they never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cohort_agent::commands::check_bytes(data);
});
