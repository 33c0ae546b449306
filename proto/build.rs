//! Compiles the protos with protox (a pure-Rust protobuf compiler), so building
//! Cohort needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/cohort/v1/common.proto",
        "proto/cohort/v1/agent.proto",
        "proto/cohort/v1/job.proto",
        "proto/cohort/v1/security.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("cohort_descriptor.bin"), &encoded)?;
    // Proto3 JSON mapping (enum names, camelCase) for `--output json`.
    pbjson_build::Builder::new().register_descriptors(&encoded)?.preserve_proto_field_names().build(&[".cohort.v1"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    Ok(())
}
