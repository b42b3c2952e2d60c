//! Entry points only: each program computes a [`Verdict`], counts it once, and returns it.
//! The logic lives in `encap.rs` (pod bridge ingress) and `decap.rs` (uplink ingress).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod encap;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{macros::classifier, programs::TcContext};

    use crate::{decap, encap, stats};

    /// TC ingress on the pod bridge: VXLAN-encapsulates pod traffic for remote subnets.
    #[classifier]
    pub fn overlay_bridge_encap(ctx: TcContext) -> i32 {
        let verdict = encap::bridge_encap(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    /// TC egress on the kernel vxlan device: replaces its encapsulation and transmit.
    #[classifier]
    pub fn overlay_vxlan_encap(ctx: TcContext) -> i32 {
        let verdict = encap::vxlan_device_encap(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    /// TC ingress on the uplink: drops spoofed VXLAN, decapsulates ours towards local pods.
    #[classifier]
    pub fn overlay_uplink_decap(ctx: TcContext) -> i32 {
        let verdict = decap::uplink_decap(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
