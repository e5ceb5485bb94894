//! Generates the tonic/prost code from elbo.proto with protox, a pure-Rust protobuf compiler,
//! so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=elbo.proto");
    let descriptors = protox::compile(["elbo.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
