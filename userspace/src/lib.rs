//! sluice: an eBPF-enforced egress proxy for AI-agent sandboxes.
//!
//! Kernel programs (`ebpf/`) attached to an enforced cgroup parent send every
//! socket of every sandbox below it to this daemon, which decides per
//! sandbox what may leave the host.

pub mod approvals;
pub mod audit;
pub mod cli;
pub mod containers;
pub mod control;
pub mod credentials;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod policy;
pub mod proxy;
pub mod rules;
pub mod sandbox;
pub mod sync;
pub mod tls;
