//! Generates the tonic/prost code from elbo.proto with protox, a pure-Rust protobuf compiler,
//! so no system `protoc` is needed, and writes the file descriptor set for server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=elbo.proto");
    let descriptors = protox::compile(["elbo.proto"], ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("elbo_descriptor.bin"), descriptors.encode_to_vec())?;
    // Ring payloads decode as `bytes::Bytes`, sliced out of the receive buffer without a copy.
    tonic_prost_build::configure()
        .bytes(".elbo.v1.Chunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
