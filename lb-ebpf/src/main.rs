//! Kernel side: XDP on node uplinks (north-south) and tc ingress on pod-facing devices
//! (east-west). Entry points are thin; the decision about a packet is made once, in
//! `flow::decide`, and each hook applies it with the means it has.
#![no_std]
#![no_main]

mod bench;
mod flow;
mod maps;
mod packet;
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
