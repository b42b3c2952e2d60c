//! Entry points only: each program computes a [`Verdict`], counts it once, and returns it.
//! The logic lives in `decap.rs` (uplink ingress: anti-spoof, R3), `deliver.rs` (vxlan device
//! ingress: R1, and local delivery), `encap.rs` (pod veth ingress: R2) and `flows.rs`
//! (learning at the vxlan device's and the pod veth's egress).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod decap;
#[cfg(target_arch = "bpf")]
mod deliver;
#[cfg(target_arch = "bpf")]
mod encap;
#[cfg(target_arch = "bpf")]
mod flows;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, macros::classifier, programs::TcContext,
    };
    use overlay_common::{BPF_F_ADJ_ROOM_DECAP_L4_UDP, VXLAN_OVERHEAD};

    use crate::{decap, deliver, encap, flows, stats};

    /// TCX ingress on the uplink: drops spoofed VXLAN; R3 for learned flows.
    #[classifier]
    pub fn overlay_uplink_decap(ctx: TcContext) -> i32 {
        let verdict = decap::uplink_decap(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    /// TCX ingress on the kernel vxlan device: R1 for learned flows.
    #[classifier]
    pub fn overlay_vxlan_deliver(ctx: TcContext) -> i32 {
        let verdict = deliver::vxlan_deliver(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    /// TCX egress on the kernel vxlan device: learns what left through the kernel path.
    #[classifier]
    pub fn overlay_vxlan_learn(ctx: TcContext) -> i32 {
        let verdict = flows::learn_egress(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    /// TCX ingress on a pod's host veth: R2 for learned flows.
    #[classifier]
    pub fn overlay_pod_encap(ctx: TcContext) -> i32 {
        let verdict = encap::pod_encap(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    /// TCX egress on a pod's host veth: learns what the kernel delivered to the pod.
    #[classifier]
    pub fn overlay_pod_learn(ctx: TcContext) -> i32 {
        let verdict = flows::learn_ingress(&ctx);
        stats::count(&verdict);
        verdict.action
    }

    /// Run by the agent with BPF_PROG_TEST_RUN on a VXLAN frame, never attached: returns 1
    /// when the kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP`, 0 when it rejects the flag.
    #[classifier]
    pub fn overlay_probe_decap_l4_udp(ctx: TcContext) -> i32 {
        let flags = aya_ebpf::bindings::BPF_F_ADJ_ROOM_FIXED_GSO as u64
            | aya_ebpf::bindings::BPF_F_ADJ_ROOM_NO_CSUM_RESET as u64
            | BPF_F_ADJ_ROOM_DECAP_L4_UDP;
        match ctx
            .skb
            .adjust_room(-(VXLAN_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, flags)
        {
            Ok(()) => 1,
            Err(_) => 0,
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
