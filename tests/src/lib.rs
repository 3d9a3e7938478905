//! Test bed for gpulb: network namespaces joined by a veth pair, processes started inside
//! them, and an HTTP client that runs inside a namespace. Every resource is a drop guard, so
//! a failing test leaves no namespace, link, pinned map or process behind.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544 benchmarking range) and exist only inside
//! the namespaces made here.
//!
//! | module | what |
//! |---|---|
//! | `netns` | namespaces, the veth topology, addresses |
//! | `proc` | processes, binaries, scratch and pin directories |
//! | `http` | chat completions, bursts, raw connects |
//! | `stack` | a whole gpulb under test, and its CLI |
//! | `load` | steady load and the slow-instance scenario |
//! | `metrics` | scraping the daemon's metrics, percentiles |
//! | `workload` | routes and arrival patterns for the steering benchmark |
#![forbid(unsafe_code)]

mod http;
mod load;
mod metrics;
mod netns;
mod proc;
mod stack;
mod workload;

pub use http::*;
pub use load::*;
pub use metrics::*;
pub use netns::*;
pub use proc::*;
pub use stack::*;
pub use workload::*;
