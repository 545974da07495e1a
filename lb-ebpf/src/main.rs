//! Kernel side: XDP on node uplinks (north-south), tc ingress on pod-facing and tunnel
//! devices (east-west), tc egress for the netfilter mode's second half, the conntrack
//! reaper the agent runs, and cgroup socket hooks (socket-level load balancing). Entry
//! points are thin; the decision about a packet is made once, in `flow::decide`, and each
//! hook applies it with the means it has.
#![no_std]
#![no_main]
// The atomic intrinsics (see atomic.rs); the build uses a compiler that allows them.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod atomic;
mod bench;
mod ct;
mod flow;
mod frag;
mod maps;
mod packet;
mod ratelimit;
mod reap;
mod select;
mod socket;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// bpf_fib_lookup and the skb checksum helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
