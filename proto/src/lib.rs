//! The gRPC protocol of elbo (`elbo.proto`): generated tonic/prost code.

/// Version 1 of the protocol.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("elbo.v1");
}
