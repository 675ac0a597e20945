//! `starcite-bench`: an open-loop (constant arrival rate) latency benchmark for the
//! Starcite append API that corrects for coordinated omission.
//!
//! - [`config`]: CLI value parsing and the run configuration
//! - [`client`]: minimal blocking HTTP/1.1 keep-alive client
//! - [`schedule`]: the open-loop arrival schedule
//! - [`stats`]: hdrhistogram recording and the run summary
//! - [`runner`]: session setup, load runs, find-max
//! - [`stub`]: in-process stub server for the self test
//! - [`selftest`]: the coordinated-omission self test

pub mod client;
pub mod config;
pub mod runner;
pub mod schedule;
pub mod selftest;
pub mod stats;
pub mod stub;
