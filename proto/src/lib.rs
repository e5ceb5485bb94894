//! The gRPC protocol of elbo (`elbo.proto`): generated tonic/prost code, and the credentials
//! its calls carry ([`auth`]).

pub mod auth;
pub mod tls;

/// Version 1 of the protocol.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("elbo.v1");
}

/// The encoded file descriptor set of `elbo.proto`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/elbo_descriptor.bin"));
