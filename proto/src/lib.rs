//! elbo-proto
//!
//! See README.md beside this crate: filled by a later issue.
