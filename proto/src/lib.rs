//! Cohort's wire types: the `cohort.v1` protos and their tonic bindings.
#![forbid(unsafe_code)]

#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("cohort.v1");
    include!(concat!(env!("OUT_DIR"), "/cohort.v1.serde.rs"));

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cohort_descriptor");
}

pub mod names;

pub use v1::*;

/// Milliseconds since the Unix epoch, the time unit of every `*_unix_ms` field.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
