//! Any text as a job file: `JobSpec::from_yaml` returns a spec or errors that
//! each name a field or a line; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    cohort_shared::spec::fuzzing::check_job_file(&text);
});
