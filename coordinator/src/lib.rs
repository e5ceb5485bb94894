//! elbo-coordinator
//!
//! See README.md beside this crate: filled by a later issue.
