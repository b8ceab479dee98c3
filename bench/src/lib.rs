//! Shared parts of the lucos benchmarks and conformance runners: a guest driven over its
//! serial console ([`guest`]) and lucos's update API from the host ([`lucos`]).

pub mod guest;
pub mod lucos;
