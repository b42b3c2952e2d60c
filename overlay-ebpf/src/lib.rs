#![no_std]
// Intentionally empty: the programs are the `overlay-ebpf` binary target (src/main.rs). This
// library target lets overlay-agent name the crate as a build-dependency so cargo rebuilds the
// agent when the programs change.
