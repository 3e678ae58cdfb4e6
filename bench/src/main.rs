//! `knock-bench`: measures knock against the XEP-0114 pipe's own limit (work in progress).

fn main() {}
